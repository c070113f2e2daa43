"""Developer tools: code generation and the local suite launcher."""
