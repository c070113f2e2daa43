// A client written the way a Node team would: grpc-js + proto-loader, loading the shipped descriptor
// set (gen/coins.protoset), mutual TLS with the gateway's certificate and a user's bearer token.
// Usage: node client.mjs '<json: {protoset, certs, wallet, gifting, token, sender, creator, live, requestId}>'
// Prints one JSON line with what each call answered.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import descriptor from "protobufjs/ext/descriptor/index.js";

const args = JSON.parse(process.argv[2]);
const definition = protoLoader.loadFileDescriptorSetFromBuffer(readFileSync(args.protoset), {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const coins = grpc.loadPackageDefinition(definition).coins;
// The same descriptor set decodes the rich error details (google.rpc.Status in a binary trailer).
const types = protobuf.Root.fromDescriptor(
  descriptor.FileDescriptorSet.decode(readFileSync(args.protoset)),
);

function errorInfo(error) {
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (!raw) return null;
  const status = types.lookupType("google.rpc.Status").decode(raw);
  for (const detail of status.details) {
    // protobufjs 7 names the Any's field type_url and decodes a map from a descriptor set as a
    // list of {key, value} entries; protobufjs 8 says typeUrl and gives an object.
    if ((detail.type_url ?? detail.typeUrl).endsWith("/google.rpc.ErrorInfo")) {
      const info = types.lookupType("google.rpc.ErrorInfo").decode(detail.value);
      const metadata = Array.isArray(info.metadata)
        ? Object.fromEntries(info.metadata.map((e) => [e.key, e.value]))
        : { ...info.metadata };
      return { reason: info.reason, domain: info.domain, metadata };
    }
  }
  return null;
}
const credentials = grpc.credentials.createSsl(
  readFileSync(join(args.certs, "ca.pem")),
  readFileSync(join(args.certs, "gateway-key.pem")),
  readFileSync(join(args.certs, "gateway.pem")),
);
const wallet = new coins.wallet.v1.WalletService(args.wallet, credentials);
const gifting = new coins.gifting.v1.GiftingService(args.gifting, credentials);

function call(client, method, request, token) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve) => {
    client[method](request, metadata, { deadline }, (error, response) => {
      resolve(
        error
          ? { code: grpc.status[error.code], details: error.details, info: errorInfo(error) }
          : { response },
      );
    });
  });
}

const before = await call(wallet, "GetBalance", { user_id: args.sender }, args.token);
const gift = {
  request_id: args.requestId,
  sender_id: args.sender,
  creator_id: args.creator,
  gift_id: "rose",
  count: 3,
  live_id: args.live,
};
const sent = await call(gifting, "SendGift", gift, args.token);
const replay = await call(gifting, "SendGift", gift, args.token); // same request id: same answer
const after = await call(wallet, "GetBalance", { user_id: args.sender }, args.token);
const foreign = await call(wallet, "GetBalance", { user_id: args.creator }, args.token);
console.log(JSON.stringify({ before, sent, replay, after, foreign }));
wallet.close();
gifting.close();
