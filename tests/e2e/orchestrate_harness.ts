/**
 * Runs `mpq orchestrate` as a separate process for end-to-end tests: collects its output, waits for
 * status lines, knows the pids of the VM's processes, and checks that none is left afterwards.
 * @module
 */
import { selfCommand } from "../../lib/cli/self.ts";

/** Generous bound for one expected event (TCG on a loaded 2-core machine); not a timing assertion. */
export const EVENT_BOUND_MS = 120_000;

const STATUS_RE =
  /\] (qemu|remote \S+|vhost \S+|ivshmem \S+)\s+(?:pid (\d+) (?:started|listening|QMP ready)|.*: restarted as pid (\d+))/;

/** Whether `pid` is a live (not zombie) process. */
export function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** Waits (bounded) until none of `pids` is alive; returns the ones still alive at the bound. */
export async function waitGone(pids: Iterable<number>, boundMs = 15_000): Promise<number[]> {
  const list = [...pids];
  const t = performance.now();
  while (performance.now() - t < boundMs) {
    if (list.every((p) => !alive(p))) return [];
    await new Promise((r) => setTimeout(r, 20));
  }
  return list.filter(alive);
}

/** The targets of /proc/PID/fd/N, by fd number. */
export function fdTable(pid: number): Map<number, string> {
  const m = new Map<number, string>();
  for (const e of Deno.readDirSync(`/proc/${pid}/fd`)) {
    try {
      m.set(Number(e.name), Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`));
    } catch { /* closed meanwhile */ }
  }
  return m;
}

/** A running `mpq orchestrate ...`. Always close() it. */
export class MpqRun {
  readonly child: Deno.ChildProcess;
  #out = "";
  #err = "";
  readonly #done: Promise<Deno.CommandStatus>;
  #waiters: Array<() => void> = [];
  /** Every VM process pid seen in status lines, by name ("qemu", "remote lsi0"). */
  readonly pids = new Map<string, number>();

  private constructor(child: Deno.ChildProcess) {
    this.child = child;
    const pump = async (s: ReadableStream<Uint8Array>, err: boolean) => {
      const dec = new TextDecoder();
      for await (const chunk of s) {
        const text = dec.decode(chunk, { stream: true });
        if (err) this.#err += text;
        else this.#out += text;
        for (const line of text.split("\n")) {
          const m = STATUS_RE.exec(line);
          if (m) this.pids.set(m[1], Number(m[2] ?? m[3]));
        }
        for (const w of this.#waiters.splice(0)) w();
      }
    };
    const pumps = Promise.all([pump(child.stdout, false), pump(child.stderr, true)]);
    this.#done = (async () => {
      const st = await child.status;
      await pumps;
      for (const w of this.#waiters.splice(0)) w();
      return st;
    })();
  }

  /** Starts `mpq <args...>`. */
  static start(args: string[]): MpqRun {
    const [exe, ...pre] = selfCommand();
    return new MpqRun(
      new Deno.Command(exe, { args: [...pre, ...args], stdout: "piped", stderr: "piped", stdin: "null" })
        .spawn(),
    );
  }

  /** Standard output so far. */
  get stdout(): string {
    return this.#out;
  }

  /** Standard error so far. */
  get stderr(): string {
    return this.#err;
  }

  /** Waits (bounded) until stdout or stderr matches `re`; throws with the output if it never does. */
  async waitFor(re: RegExp, boundMs = EVENT_BOUND_MS): Promise<RegExpMatchArray> {
    const t = performance.now();
    let ended = false;
    this.#done.then(() => (ended = true));
    while (true) {
      const m = this.#out.match(re) ?? this.#err.match(re);
      if (m) return m;
      if (ended) throw new Error(`mpq exited before ${re} appeared\n${this.report()}`);
      if (performance.now() - t > boundMs) {
        throw new Error(`${re} did not appear within ${boundMs} ms\n${this.report()}`);
      }
      const timer = delay(200);
      await Promise.race([new Promise<void>((r) => this.#waiters.push(r)), timer.promise]);
      timer.cancel();
    }
  }

  /** Waits for mpq to exit. */
  status(): Promise<Deno.CommandStatus> {
    return this.#done;
  }

  /** Output for failure messages. */
  report(): string {
    return `--- mpq stdout ---\n${this.#out}\n--- mpq stderr ---\n${this.#err}`;
  }

  /** Kills mpq (if running) and every VM process it reported, and waits for it. */
  async close(): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch { /* already exited */ }
    await this.#done;
    for (const pid of this.pids.values()) {
      try {
        if (alive(pid)) Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await waitGone(this.pids.values());
    // After SIGKILL mpq could not remove its runtime dir (dead sockets only): the test does.
    const dir = this.#out.match(/mpq qmp (\S+)\/qmp-operator\.sock/)?.[1];
    if (dir) {
      try {
        Deno.removeSync(dir, { recursive: true });
      } catch { /* removed by mpq */ }
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function delay(ms: number): { promise: Promise<void>; cancel: () => void } {
  let id: ReturnType<typeof setTimeout> | undefined;
  const promise = new Promise<void>((r) => (id = setTimeout(r, ms)));
  return { promise, cancel: () => clearTimeout(id) };
}

/** A temp dir for a test's files (topology, logs); remove it with the returned function. */
export function tempDir(prefix: string): { path: string; [Symbol.dispose](): void } {
  const path = Deno.makeTempDirSync({ prefix });
  return {
    path,
    [Symbol.dispose]() {
      Deno.removeSync(path, { recursive: true });
    },
  };
}

/** Writes a topology file and returns its path. */
export function writeTopology(dir: string, topology: unknown, name = "vm.json"): string {
  const path = `${dir}/${name}`;
  Deno.writeTextFileSync(path, JSON.stringify(topology, null, 2));
  return path;
}

/** Whether QEMU with multi-process support is here. */
export function qemuAvailable(): boolean {
  try {
    return new Deno.Command("qemu-system-x86_64", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/** Waits (bounded) until the console file matches `re`; returns the match (the report on failure). */
export async function consoleMatch(
  consoleFile: string,
  re: RegExp,
  what: string,
  run: MpqRun,
  boundMs = EVENT_BOUND_MS,
): Promise<RegExpMatchArray> {
  const deadline = Date.now() + boundMs;
  let text = "";
  while (Date.now() < deadline) {
    try {
      text = Deno.readTextFileSync(consoleFile).replaceAll("\r", "");
    } catch { /* not written yet */ }
    const m = text.match(re);
    if (m) return m;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what} never appeared\n--- console ---\n${text.slice(-3000)}\n${run.report()}`);
}

/** Waits for `MPQ:name value` on the console file; returns the value. */
export async function consoleMarker(consoleFile: string, name: string, run: MpqRun): Promise<string> {
  return (await consoleMatch(consoleFile, new RegExp(`MPQ:${name}(?: (.*))?\\n`), `MPQ:${name}`, run))[1] ??
    "";
}

/** Runs `mpq ctl ARGS...` to completion. */
export async function mpqCtl(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const [exe, ...pre] = selfCommand();
  const o = await new Deno.Command(exe, { args: [...pre, "ctl", ...args], stdout: "piped", stderr: "piped" })
    .output();
  const d = new TextDecoder();
  return { code: o.code, out: d.decode(o.stdout), err: d.decode(o.stderr) };
}

/** The control socket a run printed at its start. */
export async function controlSocketOf(run: MpqRun): Promise<string> {
  return (await run.waitFor(/\] control +mpq ctl (\S+) status/))[1];
}

/** SHA-256 of `data`, hex. */
export async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}
