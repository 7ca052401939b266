/**
 * The client side of the JSON-lines control sockets (`mpq vhost serve --control`, `mpq orchestrate`'s
 * control socket): one request, one reply.
 * @module
 */
import { InputError } from "./errors.ts";

/**
 * Sends one request to a control socket and returns the reply object (waits as long as the
 * command takes: a migration answers when it ended). Throws InputError when the socket cannot be
 * reached or answers with something that is not a reply.
 */
export async function controlRequest(
  path: string,
  cmd: string,
  args: Record<string, unknown> = {},
): Promise<{ ok: boolean; result?: unknown; error?: string }> {
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (e) {
    throw new InputError(`${path}: cannot connect: ${(e as Error).message}`);
  }
  try {
    await conn.write(new TextEncoder().encode(JSON.stringify({ id: 1, cmd, args }) + "\n"));
    const chunks: Uint8Array[] = [];
    let total = 0;
    const buf = new Uint8Array(65536);
    while (true) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
      total += n;
      if (buf.subarray(0, n).includes(10) || total > 16 << 20) break;
    }
    const all = new Uint8Array(total);
    let off = 0;
    for (const c of chunks) {
      all.set(c, off);
      off += c.byteLength;
    }
    const text = new TextDecoder().decode(all);
    const line = text.slice(0, text.indexOf("\n") >= 0 ? text.indexOf("\n") : text.length);
    if (line === "") throw new InputError(`${path}: the server closed the connection without a reply`);
    const reply = JSON.parse(line);
    if (typeof reply !== "object" || reply === null || typeof reply.ok !== "boolean") {
      throw new InputError(`${path}: not a control reply: ${line.slice(0, 200)}`);
    }
    return reply;
  } finally {
    conn.close();
  }
}
