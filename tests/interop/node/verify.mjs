// Verify a JWT with jose's createRemoteJWKSet against a JWKS URL.
// usage: node verify.mjs JWKS_URL ISSUER AUDIENCE < token
// Prints the payload as JSON and exits 0, or prints the error and exits 1.
import { createRemoteJWKSet, jwtVerify } from "jose";

const [jwksUrl, issuer, audience] = process.argv.slice(2);
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const token = Buffer.concat(chunks).toString("ascii").trim();
try {
  const jwks = createRemoteJWKSet(new URL(jwksUrl));
  const { payload, protectedHeader } = await jwtVerify(token, jwks, {
    issuer, audience, algorithms: ["RS256"],
  });
  console.log(JSON.stringify({ payload, protectedHeader }));
} catch (err) {
  console.log(JSON.stringify({ error: err.code || String(err) }));
  process.exit(1);
}
