/**
 * Socket options: whether an inherited fd is a listening socket (SO_ACCEPTCONN), so `--fd=N` and
 * systemd's fd 3 are checked before a daemon starts serving them.
 * @module
 */
import { libc } from "./_libc.ts";
import { ErrnoError, lastErrno } from "./errno.ts";
import type { OwnedFd } from "./fd.ts";

const SOL_SOCKET = 1;
const SO_ACCEPTCONN = 30;
const ENOTSOCK = 88;

/**
 * Whether `fd` is a socket in the listening state. False for a socket that does not listen;
 * throws ErrnoError ENOTSOCK naming the fd for anything that is not a socket (EBADF if not open).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memfdCreate } from "./memory.ts";
 * import { listenUnix } from "./socket.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const listener = listenUnix(`${dir}/a.sock`);
 * assert.equal(isListeningSocket(listener.fd), true);
 * using memfd = memfdCreate("not a socket");
 * assert.throws(() => isListeningSocket(memfd), { code: "ENOTSOCK" });
 * listener.close(); // unlinks the socket
 * Deno.removeSync(dir);
 * ```
 */
export function isListeningSocket(fd: OwnedFd): boolean {
  const val = new Int32Array(1);
  const len = new Uint32Array([4]);
  const r = libc.getsockopt(
    fd.unsafeFd,
    SOL_SOCKET,
    SO_ACCEPTCONN,
    new Uint8Array(val.buffer),
    new Uint8Array(len.buffer),
  );
  if (r === -1) {
    const e = lastErrno();
    throw new ErrnoError(
      "getsockopt(SO_ACCEPTCONN)",
      e,
      `${fd.label}${e === ENOTSOCK ? " is not a socket" : ""}`,
    );
  }
  return val[0] !== 0;
}
