/**
 * `mpq ivshmem client`: interactive like contrib ivshmem-client, and scriptable.
 * @module
 */
import { parseArgs } from "node:util";
import { Reactor } from "../../ffi/mod.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import { IvshmemClient, type IvshmemEvent } from "./client.ts";

/** Exit code when --timeout ends a scripted run. */
export const TIMEOUT_EXIT = 2;

/** Client usage. */
export const CLIENT_USAGE = `Usage: mpq ivshmem client [OPTION]...
Connects to an ivshmem server as one more peer. Without --notify/--wait/--read/--write it is
interactive (commands on stdin, as contrib ivshmem-client); with them it runs the script and exits.
  -h, --help                   show this help
  -v, --verbose                debug lines on stderr
  -S, --socket-path <path>     server socket, default /tmp/ivshmem_socket
      --json                   print events as JSON lines (see below)
      --write <offset>:<hex>   write bytes into the shared memory (before notifying)
      --notify <peer>:<vector> ring a peer's vector ("all" for every vector); repeatable;
                               waits for the peer to join if it is not there yet
      --wait <n>               exit after n notifications on our vectors
      --timeout <seconds>      give up the scripted run after this long (exit ${TIMEOUT_EXIT})
      --read <offset>:<len>    print shared memory (after the wait): hex dump, or "hex" in JSON
Order of a scripted run: join, --write, --notify, --wait, --read, exit 0.
Offsets and lengths are decimal or 0x hex. Exit: 0 done, 1 error, ${TIMEOUT_EXIT} timeout.
JSON events, one object per line:
  {"event":"joined","id":N,"vectors":V,"peers":[...],"shmSize":BYTES}
  {"event":"peer-joined","peer":N,"vectors":V}   {"event":"peer-left","peer":N}
  {"event":"notification","vector":V,"count":C}   (C = eventfd counter: kicks may coalesce)
  {"event":"notified","peer":N,"vector":V}   {"event":"write","offset":O,"length":L}
  {"event":"read","offset":O,"length":L,"hex":"..."}
  {"event":"disconnected","reason":"..."}   {"event":"timeout","notifications":C}
Interactive commands: dump, int <peer> <vector>, int <peer> all, int all,
  read <offset> <len>, write <offset> <hex>, help, quit.`;

const HELP = `dump: dump peers (including us)
int <peer> <vector>: notify one vector on a peer
int <peer> all: notify all vectors of a peer
int all: notify all vectors of all peers (excepting us)
read <offset> <len>: hex dump of the shared memory
write <offset> <hex>: write bytes into the shared memory
quit: leave`;

/** Parsed client options. */
export interface ClientArgs {
  verbose: boolean;
  socketPath: string;
  json: boolean;
  writes: Array<{ offset: number; data: Uint8Array }>;
  notifies: Array<{ peer: number; vector: number | "all" }>;
  wait: number | null;
  timeoutMs: number | null;
  reads: Array<{ offset: number; length: number }>;
}

function parseNumber(text: string, what: string): number {
  const t = text.trim();
  const n = /^0x[0-9a-f]+$/i.test(t) ? parseInt(t, 16) : /^\d+$/.test(t) ? parseInt(t, 10) : NaN;
  if (!Number.isSafeInteger(n)) {
    throw new UsageError(`${what}: not a number: ${JSON.stringify(text)}`, CLIENT_USAGE);
  }
  return n;
}

/** Decodes a hex string ("deadbeef", optional 0x) into bytes. */
export function parseHex(text: string, what = "hex"): Uint8Array {
  const t = text.replace(/^0x/i, "");
  if (t.length === 0 || t.length % 2 !== 0 || !/^[0-9a-f]*$/i.test(t)) {
    throw new UsageError(
      `${what}: expected an even number of hex digits: got ${JSON.stringify(text)}`,
      CLIENT_USAGE,
    );
  }
  const out = new Uint8Array(t.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(t.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Bytes as lowercase hex. */
export function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A hex dump: offset, 16 bytes, printable characters. */
export function hexDump(bytes: Uint8Array, base = 0): string {
  const lines: string[] = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = bytes.subarray(i, i + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${(base + i).toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  |${text}|`);
  }
  return lines.join("\n");
}

function split(value: string, flag: string): [string, string] {
  const i = value.indexOf(":");
  if (i <= 0 || i === value.length - 1) {
    throw new UsageError(`${flag}: expected A:B: got ${JSON.stringify(value)}`, CLIENT_USAGE);
  }
  return [value.slice(0, i), value.slice(i + 1)];
}

/**
 * Parses client flags; throws UsageError naming the flag; null for --help.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const args = parseClientArgs(["--json", "--wait", "1", "--notify", "0:all", "--write", "0:cafe"]);
 * assert.equal(args?.socketPath, "/tmp/ivshmem_socket");
 * assert.deepEqual(args?.notifies, [{ peer: 0, vector: "all" }]);
 * assert.deepEqual(args?.writes, [{ offset: 0, data: new Uint8Array([0xca, 0xfe]) }]);
 * assert.equal(args?.wait, 1);
 * ```
 */
export function parseClientArgs(args: string[]): ClientArgs | null {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        help: { type: "boolean", short: "h" },
        verbose: { type: "boolean", short: "v" },
        "socket-path": { type: "string", short: "S" },
        json: { type: "boolean" },
        notify: { type: "string", multiple: true },
        wait: { type: "string" },
        timeout: { type: "string" },
        read: { type: "string", multiple: true },
        write: { type: "string", multiple: true },
      },
    });
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e), CLIENT_USAGE);
  }
  const v = parsed.values;
  if (v.help) return null;
  const notifies = (v.notify ?? []).map((s) => {
    const [p, vec] = split(s, "--notify");
    const peer = parseNumber(p, "--notify peer");
    if (peer > 0xffff) throw new UsageError(`--notify peer must be 0..65535: got ${peer}`, CLIENT_USAGE);
    return { peer, vector: vec === "all" ? "all" as const : parseNumber(vec, "--notify vector") };
  });
  const writes = (v.write ?? []).map((s) => {
    const [o, hex] = split(s, "--write");
    return { offset: parseNumber(o, "--write offset"), data: parseHex(hex, "--write") };
  });
  const reads = (v.read ?? []).map((s) => {
    const [o, l] = split(s, "--read");
    return { offset: parseNumber(o, "--read offset"), length: parseNumber(l, "--read length") };
  });
  let wait: number | null = null;
  if (v.wait !== undefined) {
    wait = parseNumber(v.wait, "--wait");
    if (wait < 1) throw new UsageError(`--wait must be >= 1: got ${wait}`, CLIENT_USAGE);
  }
  let timeoutMs: number | null = null;
  if (v.timeout !== undefined) {
    const s = Number(v.timeout);
    if (!/^\d+(\.\d+)?$/.test(v.timeout.trim()) || !(s > 0)) {
      throw new UsageError(
        `--timeout must be a number of seconds > 0: got ${JSON.stringify(v.timeout)}`,
        CLIENT_USAGE,
      );
    }
    timeoutMs = s * 1000;
  }
  if (v["socket-path"] === "") throw new UsageError("-S/--socket-path must not be empty", CLIENT_USAGE);
  return {
    verbose: v.verbose ?? false,
    socketPath: v["socket-path"] ?? "/tmp/ivshmem_socket",
    json: v.json ?? false,
    writes,
    notifies,
    wait,
    timeoutMs,
    reads,
  };
}

function text(e: IvshmemEvent): string {
  switch (e.event) {
    case "joined":
      return `our_id = ${e.id} (${e.vectors} vector(s), shm ${e.shmSize} bytes, peers: ${
        e.peers.join(", ") || "none"
      })`;
    case "peer-joined":
      return `new peer id = ${e.peer} (${e.vectors} vector(s))`;
    case "peer-left":
      return `delete peer id = ${e.peer}`;
    case "notification":
      return `receive notification on vector=${e.vector} (count ${e.count})`;
    case "disconnected":
      return `disconnected from server: ${e.reason}`;
  }
}

class TimeoutError extends Error {}

/** `mpq ivshmem client [...]`. */
export async function clientMain(args: string[]): Promise<number> {
  const opts = parseClientArgs(args);
  if (opts === null) {
    console.log(CLIENT_USAGE);
    return 0;
  }
  const scripted = opts.writes.length + opts.notifies.length + opts.reads.length > 0 || opts.wait !== null;
  const out = (obj: Record<string, unknown>, line: string) =>
    console.log(opts.json ? JSON.stringify(obj) : line);
  let notifications = 0;
  const onNotify = new Set<() => void>();
  const reactor = new Reactor({
    onError: (e) => console.error(`mpq ivshmem client: ${e instanceof Error ? e.message : e}`),
  });
  const running = reactor.run();
  let client: IvshmemClient | null = null;
  const deadline = opts.timeoutMs !== null && scripted ? Date.now() + opts.timeoutMs : null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    if (deadline !== null) timer = setTimeout(() => reject(new TimeoutError()), deadline - Date.now());
  });
  timedOut.catch(() => {});
  const race = <T>(p: Promise<T>) => deadline === null ? p : Promise.race([p, timedOut]);
  try {
    try {
      client = await race(IvshmemClient.connect(reactor, opts.socketPath, {
        queueEvents: false,
        log: opts.verbose ? (l) => console.error(l) : undefined,
        onEvent: (e) => {
          if (e.event === "notification") {
            notifications += e.count;
            for (const f of onNotify) f();
          }
          out(e, text(e));
          if (e.event === "disconnected") { for (const f of onNotify) f(); }
        },
      }));
    } catch (e) {
      if (e instanceof TimeoutError) throw e;
      throw new InputError(`cannot connect to ${opts.socketPath}: ${e instanceof Error ? e.message : e}`);
    }
    const c = client;
    if (!scripted) return await interactive(c, opts, out);
    for (const w of opts.writes) {
      c.write(w.offset, w.data);
      out(
        { event: "write", offset: w.offset, length: w.data.length },
        `wrote ${w.data.length} byte(s) at ${w.offset}`,
      );
    }
    for (const n of opts.notifies) {
      if (n.peer !== c.id && !c.peers().has(n.peer)) {
        await race(
          new Promise<void>((resolve, reject) => {
            const check = () => {
              if (c.peers().has(n.peer)) {
                onNotify.delete(check);
                resolve();
              } else if (c.disconnected !== null) {
                onNotify.delete(check);
                reject(new InputError(`server closed the connection before peer ${n.peer} joined`));
              }
            };
            onNotify.add(check);
            c.next((e) => e.event === "peer-joined" && e.peer === n.peer).then(check, () => {});
            check();
          }),
        );
      }
      const vectors = n.vector === "all"
        ? [...Array(n.peer === c.id ? c.vectors : c.peers().get(n.peer) ?? 0).keys()]
        : [n.vector];
      for (const vec of vectors) {
        try {
          c.notify(n.peer, vec);
        } catch (e) {
          throw new InputError(`--notify ${n.peer}:${n.vector}: ${(e as Error).message}`);
        }
        out({ event: "notified", peer: n.peer, vector: vec }, `notified peer ${n.peer} vector ${vec}`);
      }
    }
    if (opts.wait !== null) {
      const want = opts.wait;
      await race(
        new Promise<void>((resolve, reject) => {
          const check = () => {
            if (notifications >= want) {
              onNotify.delete(check);
              resolve();
            } else if (c.disconnected !== null) {
              onNotify.delete(check);
              reject(
                new InputError(
                  `server closed the connection after ${notifications} of ${want} notification(s)`,
                ),
              );
            }
          };
          onNotify.add(check);
          check();
        }),
      );
    }
    for (const r of opts.reads) {
      let bytes: Uint8Array;
      try {
        bytes = c.read(r.offset, r.length);
      } catch (e) {
        throw new InputError(`--read ${r.offset}:${r.length}: ${(e as Error).message}`);
      }
      out({ event: "read", offset: r.offset, length: r.length, hex: toHex(bytes) }, hexDump(bytes, r.offset));
    }
    return 0;
  } catch (e) {
    if (e instanceof TimeoutError) {
      out(
        { event: "timeout", notifications },
        `timed out after ${opts.timeoutMs! / 1000} s (${notifications} notification(s))`,
      );
      if (!opts.json) console.error(`mpq ivshmem client: timed out after ${opts.timeoutMs! / 1000} s`);
      return TIMEOUT_EXIT;
    }
    throw e;
  } finally {
    if (timer !== undefined) clearTimeout(timer);
    client?.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}

async function interactive(
  c: IvshmemClient,
  opts: ClientArgs,
  out: (obj: Record<string, unknown>, line: string) => void,
): Promise<number> {
  const prompt = () => {
    if (!opts.json) Deno.stdout.writeSync(new TextEncoder().encode("cmd> "));
  };
  if (!opts.json) console.log(HELP);
  prompt();
  const disconnected = c.next((e) => e.event === "disconnected", { keep: true }).then(() =>
    "disconnected" as const
  );
  disconnected.catch(() => {});
  const reader = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  try {
    while (true) {
      const r = await Promise.race([reader.read(), disconnected]);
      if (r === "disconnected") return 1;
      if (r.done) return 0;
      pending += r.value;
      const lines = pending.split(/[\r\n;]/);
      pending = lines.pop() ?? "";
      if (pending.length > 4096) {
        console.log("invalid command (longer than 4096 characters), type help");
        pending = "";
      }
      for (const raw of lines) {
        const line = raw.trim().replace(/\s+/g, " ");
        if (line === "") continue;
        if (line === "quit" || line === "exit") return 0;
        try {
          command(c, line, out);
        } catch (e) {
          console.log(e instanceof Error ? e.message : String(e));
        }
      }
      prompt();
    }
  } finally {
    reader.releaseLock();
  }
}

function command(
  c: IvshmemClient,
  line: string,
  out: (obj: Record<string, unknown>, line: string) => void,
): void {
  let m: RegExpExecArray | null;
  if (line === "help" || line === "?") console.log(HELP);
  else if (line === "dump") console.log(c.dump());
  else if (line === "int all") c.broadcast();
  else if ((m = /^int (\d+) (\d+)$/.exec(line))) c.notify(Number(m[1]), Number(m[2]));
  else if ((m = /^int (\d+) all$/.exec(line))) c.notifyAll(Number(m[1]));
  else if ((m = /^read (\S+) (\S+)$/.exec(line))) {
    const offset = parseNumber(m[1], "read offset");
    const length = parseNumber(m[2], "read length");
    const bytes = c.read(offset, length);
    out({ event: "read", offset, length, hex: toHex(bytes) }, hexDump(bytes, offset));
  } else if ((m = /^write (\S+) (\S+)$/.exec(line))) {
    const offset = parseNumber(m[1], "write offset");
    const data = parseHex(m[2], "write");
    c.write(offset, data);
    out({ event: "write", offset, length: data.length }, `wrote ${data.length} byte(s) at ${offset}`);
  } else console.log("invalid command, type help");
}
