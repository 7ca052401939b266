import assert from "node:assert/strict";
import { ErrnoError, isListeningSocket, listenUnix, memfdCreate, socketPair } from "./mod.ts";

Deno.test("sockopt isListeningSocket tells listening sockets from connected ones and non-sockets", () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-sockopt-" });
  const listener = listenUnix(`${dir}/l.sock`);
  const [a, b] = socketPair();
  const mem = memfdCreate("not-a-socket");
  try {
    assert.equal(isListeningSocket(listener.fd), true);
    assert.equal(isListeningSocket(a.fd), false);
    assert.throws(
      () => isListeningSocket(mem),
      (e) => e instanceof ErrnoError && /not a socket/.test(e.message),
    );
  } finally {
    mem.close();
    a.close();
    b.close();
    listener.close();
    Deno.removeSync(dir, { recursive: true });
  }
});
