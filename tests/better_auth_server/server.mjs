// A real Better Auth server for the tests (tests/test_better_auth.py): email and password
// sign-up/sign-in, the `bearer` plugin (the session token in `set-auth-token`, accepted back as
// `Authorization: Bearer <token>`) and the `jwt` plugin (/api/auth/token, /api/auth/jwks), on a
// SQLite file whose schema Better Auth's own migrations create at start.
//
// Environment: PORT (required), DATABASE_PATH (required), BETTER_AUTH_SECRET (required),
// BASE_URL (default http://127.0.0.1:$PORT). Prints one line "listening <url>" when ready.
// Node 20 with better-sqlite3 12 (13 needs Node 22). Offline: telemetry and rate limits are off.

import http from "node:http";

import Database from "better-sqlite3";
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { bearer, jwt } from "better-auth/plugins";

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is required`);
    process.exit(2);
  }
  return value;
}

const port = Number(required("PORT"));
const baseURL = process.env.BASE_URL || `http://127.0.0.1:${port}`;

const options = {
  baseURL,
  secret: required("BETTER_AUTH_SECRET"),
  database: new Database(required("DATABASE_PATH")),
  emailAndPassword: { enabled: true, autoSignIn: true },
  plugins: [bearer(), jwt()],
  rateLimit: { enabled: false },
  telemetry: { enabled: false },
  trustedOrigins: [baseURL],
};

const { runMigrations } = await getMigrations(options);
await runMigrations();

const auth = betterAuth(options);
const handler = toNodeHandler(auth);

const server = http.createServer((request, response) => {
  if (request.url === "/healthz") {
    response.writeHead(200, { "content-type": "text/plain" }).end("ok");
    return;
  }
  handler(request, response);
});

server.listen(port, "127.0.0.1", () => {
  console.log(`listening ${baseURL}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
