/**
 * Helpers for the ivshmem integration tests: an in-process server on a running reactor, raw
 * protocol peers over real sockets, and the `mpq ivshmem` CLI as a child process.
 * @module
 */
import { connectUnix, type OwnedFd, Reactor, type UnixSocket } from "../../ffi/mod.ts";
import { IvshmemServer, type ServerOptions } from "../../lib/ivshmem/server.ts";
import { decodeMessage, MESSAGE_SIZE } from "../../lib/ivshmem/protocol.ts";
import { selfCommand } from "../../lib/cli/self.ts";

/** How long a helper waits before failing a test that would otherwise hang (not a timing assertion). */
export const GUARD_MS = 20_000;

const delay = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A temp dir with a socket path and a unique shm name; remove() cleans both. */
export function scratch(): { dir: string; socketPath: string; shmName: string; remove(): void } {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-ivshmem-" });
  const shmName = `mpq-test-${crypto.randomUUID().slice(0, 8)}`;
  return {
    dir,
    socketPath: `${dir}/sock`,
    shmName,
    remove() {
      Deno.removeSync(dir, { recursive: true });
      try {
        Deno.removeSync(`/dev/shm/${shmName}`);
      } catch { /* gone */ }
    },
  };
}

/** An in-process server on its own running reactor. */
export class TestServer {
  readonly reactor: Reactor;
  readonly server: IvshmemServer;
  readonly #running: Promise<void>;
  readonly log: string[] = [];

  constructor(options: Omit<ServerOptions, "log">) {
    let server: IvshmemServer | null = null;
    this.reactor = new Reactor({ onError: (e) => server?.handleError(e) });
    try {
      server = IvshmemServer.open(this.reactor, { ...options, log: (l) => this.log.push(l) });
    } catch (e) {
      this.reactor.close();
      throw e;
    }
    this.server = server;
    this.#running = this.reactor.run();
  }

  /** Waits (yielding to the reactor) until `cond` holds; throws after GUARD_MS. */
  async until(cond: () => boolean, what: string): Promise<void> {
    const end = Date.now() + GUARD_MS;
    while (!cond()) {
      if (Date.now() > end) {
        throw new Error(`gave up waiting for ${what}; server log:\n${this.log.join("\n")}`);
      }
      await delay(2);
    }
  }

  async close(): Promise<void> {
    this.server.close();
    this.reactor.stop();
    await this.#running;
    this.reactor.close();
  }
}

/** One received protocol message. */
export interface RawMessage {
  value: bigint;
  fd: OwnedFd | null;
}

/** A peer speaking the raw protocol over a real socket (nonblocking; polls with short sleeps). */
export class RawPeer {
  readonly sock: UnixSocket;
  readonly #buf = new Uint8Array(MESSAGE_SIZE);

  constructor(path: string) {
    this.sock = connectUnix(path, { maxFds: 1 });
  }

  /** The next message; throws if the server closes or nothing comes within GUARD_MS. */
  recv(): Promise<RawMessage> {
    return this.recvUnless(() => false) as Promise<RawMessage>;
  }

  /** Like recv(), but resolves null when nothing is waiting and `stop()` holds. */
  async recvUnless(stop: () => boolean): Promise<RawMessage | null> {
    let have = 0;
    let fd: OwnedFd | null = null;
    const end = Date.now() + GUARD_MS;
    while (have < MESSAGE_SIZE) {
      const r = this.sock.recvMsg(this.#buf.subarray(have));
      if (r === null) {
        if (have === 0 && stop()) return null;
        if (Date.now() > end) throw new Error(`no message within ${GUARD_MS} ms (had ${have} bytes)`);
        await delay(1);
        continue;
      }
      if (r.bytes === 0) {
        fd?.close();
        throw new Error("server closed the connection");
      }
      for (const f of r.fds) {
        if (fd) f.close();
        else fd = f;
      }
      have += r.bytes;
    }
    return { value: decodeMessage(this.#buf), fd };
  }

  /** Receives `n` messages. */
  async recvMany(n: number): Promise<RawMessage[]> {
    const out: RawMessage[] = [];
    for (let i = 0; i < n; i++) out.push(await this.recv());
    return out;
  }

  /** The whole join sequence: version, id, shm, others' vectors, then `vectors` own ones. */
  async recvJoin(vectors: number): Promise<RawMessage[]> {
    const out = await this.recvMany(3);
    let own = 0;
    while (own < vectors) {
      const m = await this.recv();
      out.push(m);
      if (m.value === out[1].value && m.fd !== null) own++;
    }
    return out;
  }

  /** Whether a message is waiting right now (it is consumed and its fd closed). */
  pending(): boolean {
    const r = this.sock.recvMsg(this.#buf);
    if (r === null) return false;
    for (const f of r.fds) f.close();
    return true;
  }

  /** Resolves once the server closed the connection (data before that is discarded). */
  async closedByServer(): Promise<void> {
    const end = Date.now() + GUARD_MS;
    while (true) {
      let r;
      try {
        r = this.sock.recvMsg(this.#buf);
      } catch (e) {
        // Closed with our data unread: the kernel reports a reset.
        if (e instanceof Error && (e as { code?: string }).code === "ECONNRESET") return;
        throw e;
      }
      if (r !== null) {
        for (const f of r.fds) f.close();
        if (r.bytes === 0) return;
        continue;
      }
      if (Date.now() > end) throw new Error("server did not close the connection");
      await delay(2);
    }
  }

  close(): void {
    this.sock.close();
  }
}

/** Closes every fd of the given messages. */
export function closeAll(msgs: RawMessage[]): void {
  for (const m of msgs) m.fd?.close();
}

/** `mpq ivshmem ...` as a child process with piped output. */
export function mpq(args: string[]): Deno.Command {
  const [exe, ...pre] = selfCommand();
  return new Deno.Command(exe, { args: [...pre, "ivshmem", ...args], stdout: "piped", stderr: "piped" });
}

/** A foreground server child; ready once it printed "listening on". */
export class ServerProcess {
  readonly child: Deno.ChildProcess;
  readonly #reader: ReadableStreamDefaultReader<string>;
  readonly #stderr: Promise<string>;
  #out = "";

  private constructor(args: string[]) {
    const [exe, ...pre] = selfCommand();
    this.child = new Deno.Command(exe, {
      args: [...pre, "ivshmem", "-F", ...args],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#reader = this.child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    this.#stderr = new Response(this.child.stderr).text();
  }

  static async start(args: string[]): Promise<ServerProcess> {
    const p = new ServerProcess(args);
    while (!p.#out.includes("listening on")) {
      const r = await p.#reader.read();
      if (r.done) {
        const st = await p.child.status;
        throw new Error(`server exited (${st.code}) before listening: ${p.#out}${await p.#stderr}`);
      }
      p.#out += r.value;
    }
    return p;
  }

  /** Sends `signal` and returns the exit code with all output. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      this.child.kill(signal);
    } catch { /* already exited */ }
    while (true) {
      const r = await this.#reader.read();
      if (r.done) break;
      this.#out += r.value;
    }
    this.#reader.releaseLock();
    const st = await this.child.status;
    return { code: st.code, stdout: this.#out, stderr: await this.#stderr };
  }
}
