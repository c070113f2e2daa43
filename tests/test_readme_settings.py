"""The README's configuration documents every setting a service reads: an operator looking up a
variable finds it (a review found seven of the common ones missing from the table)."""

from __future__ import annotations

from pathlib import Path

from runtime.config import SecuritySettings, ServiceSettings
from tools.suite import SETTINGS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TABLES = "\n".join(line for line in README.splitlines() if line.startswith("|"))
"""The configuration tables: a setting named only in prose is not found where operators look (a
review found twelve so)."""


def test_every_setting_is_in_the_readme() -> None:
    missing = [f"COINS_{name.upper()}" for name in SecuritySettings.model_fields] + [
        f"<SVC>_{name.upper()}" for name in ServiceSettings.model_fields if name != "security"
    ]
    for settings_type in SETTINGS.values():
        prefix = str(settings_type.model_config.get("env_prefix", ""))
        for name in settings_type.model_fields:
            if name not in ServiceSettings.model_fields:
                variable = f"{prefix}{name.upper()}"
                shared = f"<SVC>_{name.upper()}"  # the ledger's settings, in wallet and payout
                missing.append(variable if shared not in TABLES else shared)
    assert [v for v in missing if v not in TABLES] == []
