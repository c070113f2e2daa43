// Watching a LIVE's gift feed the way an outside team would: no .proto files and no descriptor set,
// only what the server says about itself through gRPC reflection (grpc-js-reflection-client), then a
// server-streaming WatchLive call over mutual TLS with a viewer's token.
// Usage: node watch.mjs '<json: {certs, gifting, token, live, afterCursor}>'
// Prints one JSON line with every event from the LIVE's start (or after afterCursor) to its end.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import grpc from "@grpc/grpc-js";
import reflection from "grpc-js-reflection-client";

const args = JSON.parse(process.argv[2]);
const credentials = grpc.credentials.createSsl(
  readFileSync(join(args.certs, "ca.pem")),
  readFileSync(join(args.certs, "gateway-key.pem")),
  readFileSync(join(args.certs, "gateway.pem")),
);
const service = "coins.gifting.v1.GiftingService";
const found = await new reflection.GrpcReflection(args.gifting, credentials).getDescriptorBySymbol(
  service,
);
const coins = grpc.loadPackageDefinition(
  found.getPackageDefinition({ keepCase: true, longs: String, enums: String, oneofs: true }),
).coins;
const gifting = new coins.gifting.v1.GiftingService(args.gifting, credentials);
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${args.token}`);
const deadline = new Date(Date.now() + 60_000);
const call = gifting.WatchLive(
  { live_id: args.live, after_cursor: args.afterCursor ?? 0 },
  metadata,
  { deadline },
);
const events = [];
call.on("data", (event) => {
  events.push(event);
  if (event.event === "ended") call.cancel();
});
call.on("error", (error) => {
  if (error.code !== grpc.status.CANCELLED) {
    console.log(JSON.stringify({ error: { code: grpc.status[error.code], details: error.details } }));
    process.exit(0);
  }
});
call.on("close", () => {
  console.log(JSON.stringify({ events }));
  gifting.close();
});
