/**
 * Executes a launch plan: opens the sockets, starts the children in order with exactly their fds,
 * waits for each to be ready, runs the QMP managed start, and tears everything down in reverse.
 * @module
 */
import {
  type ChildProcess,
  type ExitStatus,
  getpid,
  listenUnix,
  type OwnedFd,
  type Reactor,
  resolveExecutable,
  Signal,
  socketPair,
  spawn,
  type UnixListener,
  type UnixSocket,
  unlinkPath,
} from "../../ffi/mod.ts";
import { matchesExpectation, QmpClient, QmpError, type QmpGreeting, QmpProtocolError } from "./qmp.ts";
import { MPQ_UNIX_PREFIX } from "./migration.ts";
import { withParentDeathSignal } from "./pdeathsig.ts";
import type { Plan, PlannedProcess, PlannedQmpCommand, Resource } from "./plan.ts";

/** A failure while starting the VM; names the process or QMP step. */
export class LaunchError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LaunchError";
  }
}

/** A child of the VM while mpq supervises it. */
export interface RunningChild {
  planned: PlannedProcess;
  process: ChildProcess;
  /** Resolves with the exit status once the child is reaped. */
  exited: Promise<ExitStatus>;
  /** True once teardown has started stopping it (its exit is then expected). */
  stopping: boolean;
  /** Reaps the child now if it has exited (resolving `exited`); null while it runs. */
  check(): ExitStatus | null;
  /** performance.now() when it was started. */
  startedAt: number;
}

/** Options for a Vm. */
export interface VmOptions {
  /** Status lines (default: none). */
  log?: (line: string) => void;
  /** Bound for each teardown stage (QMP quit, SIGTERM) before the next one, ms (default 5000). */
  stopTimeoutMs?: number;
  /** Bound for a "listening" readiness check, ms (default 20000). */
  readyTimeoutMs?: number;
  /** Called when a child exits while not being stopped. */
  onUnexpectedExit?: (child: RunningChild, status: ExitStatus) => void;
}

/**
 * Whether a UNIX socket at `path` is listening, from /proc/net/unix (flag __SO_ACCEPTCON). Never
 * connects: a probe connection would count as a peer for ivshmem or vhost-user servers.
 */
export function isListening(path: string): boolean {
  let text: string;
  try {
    text = Deno.readTextFileSync("/proc/net/unix");
  } catch {
    return false;
  }
  for (const line of text.split("\n")) {
    const cols = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path
    if (cols.length >= 8 && cols.slice(7).join(" ") === path && (parseInt(cols[3], 16) & 0x10000) !== 0) {
      return true;
    }
  }
  return false;
}

function delay(ms: number): { promise: Promise<void>; cancel: () => void } {
  let id: ReturnType<typeof setTimeout> | undefined;
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
    id = setTimeout(r, ms);
  });
  return {
    promise,
    cancel: () => {
      clearTimeout(id);
      resolve();
    },
  };
}

/** Waits for `p` at most `ms`; true when it settled in time. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  const d = delay(ms);
  try {
    return await Promise.race([p.then(() => true, () => true), d.promise.then(() => false)]);
  } finally {
    d.cancel();
  }
}

function summary(result: unknown): string {
  if (
    result === undefined ||
    (typeof result === "object" && result !== null && Object.keys(result).length === 0)
  ) {
    return "ok";
  }
  const s = JSON.stringify(result);
  return s.length > 160 ? `${s.slice(0, 157)}...` : s;
}

/**
 * One VM: its sockets, children and QMP connection.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 * import { planTopology } from "./plan.ts";
 * import { validateTopology } from "./topology.ts";
 *
 * const runtimeDir = Deno.makeTempDirSync({ prefix: "mpq-" }); // stop() removes it
 * const topology = validateTopology({ memory: "16M", console: "none" }); // qemu-system-x86_64, no guest OS
 * const plan = planTopology(topology, { runtimeDir, self: ["mpq"] });
 * const reactor = new Reactor();
 * const running = reactor.run();
 * const vm = new Vm(plan, reactor); // { log: console.log } for status lines
 * try {
 *   await vm.start(); // children started in order, each ready; the QMP managed start run
 *   assert.deepEqual(vm.children.map((c) => c.planned.name), ["qemu"]);
 * } finally {
 *   await vm.stop(); // also after a failed start: every child reaped, every socket closed
 * }
 * reactor.stop();
 * await running;
 * reactor.close();
 * ```
 */
export class Vm {
  readonly plan: Plan;
  readonly children: RunningChild[] = [];
  readonly #reactor: Reactor;
  readonly #opts: VmOptions;
  readonly #listeners = new Map<string, UnixListener>();
  readonly #pairs = new Map<string, [UnixSocket, UnixSocket]>();
  readonly #createdPaths: string[] = [];
  readonly #t0 = performance.now();
  #qmp: QmpClient | null = null;
  #greeting: QmpGreeting | null = null;
  #stopped = false;

  constructor(plan: Plan, reactor: Reactor, options: VmOptions = {}) {
    this.plan = plan;
    this.#reactor = reactor;
    this.#opts = options;
  }

  /** The orchestrator's QMP connection once QEMU is ready. */
  get qmp(): QmpClient | null {
    return this.#qmp;
  }

  /** QEMU's QMP greeting once received. */
  get greeting(): QmpGreeting | null {
    return this.#greeting;
  }

  /** Seconds since this Vm was made, for status lines. */
  elapsed(): string {
    return ((performance.now() - this.#t0) / 1000).toFixed(2).padStart(6);
  }

  #log(what: string, text: string): void {
    this.#opts.log?.(`[${this.elapsed()}s] ${what.padEnd(14)} ${text}`);
  }

  /**
   * Checks everything that can be checked without starting anything: executables on PATH and
   * external sockets listening. Throws LaunchError naming the problem.
   */
  preflight(): void {
    for (const p of this.plan.processes) {
      try {
        resolveExecutable(p.argv[0]);
      } catch {
        throw new LaunchError(`${p.name}: program ${p.argv[0]} not found on PATH`);
      }
    }
    for (const e of this.plan.external) {
      if (!isListening(e.path)) {
        throw new LaunchError(`${e.purpose}: nothing is listening on ${e.path}`);
      }
    }
  }

  #open(): void {
    for (const r of this.plan.resources) {
      if (r.kind === "listen") {
        this.#listeners.set(r.id, listenUnix(r.path, { nonBlocking: false }));
        this.#createdPaths.push(r.path);
      } else {
        this.#pairs.set(r.id, socketPair({ nonBlocking: false }));
      }
    }
  }

  #fdsFor(p: PlannedProcess): Map<number, OwnedFd> {
    const m = new Map<number, OwnedFd>();
    for (const a of p.fds) {
      const l = this.#listeners.get(a.resource);
      if (l) m.set(a.fd, l.fd);
      else {
        const pair = this.#pairs.get(a.resource);
        if (!pair) throw new LaunchError(`${p.name}: fd ${a.fd} refers to unknown resource ${a.resource}`);
        m.set(a.fd, pair[a.end ?? 0].fd);
      }
    }
    return m;
  }

  /**
   * Closes mpq's copies of the resources `p` was given (the child holds them now); a restartable
   * child's are kept, for the next one.
   */
  #release(p: PlannedProcess): void {
    if (p.restart) return;
    for (const a of p.fds) {
      const l = this.#listeners.get(a.resource);
      if (l) {
        l.fd.close(); // not l.close(): the path stays bound for the child; teardown unlinks it
        this.#listeners.delete(a.resource);
      }
      const pair = this.#pairs.get(a.resource);
      if (pair) pair[a.end ?? 0].fd.close();
    }
  }

  /**
   * Starts one more child while the VM runs (hot-plug): opens its resources, spawns it before QEMU
   * in stop order (QEMU is stopped first, as for the planned ones) and waits until it is ready.
   * Throws LaunchError (everything it opened closed again) when it cannot.
   */
  async addProcess(p: PlannedProcess, resources: Resource[]): Promise<RunningChild> {
    if (this.#stopped) throw new LaunchError(`not starting ${p.name}: the VM is being torn down`);
    for (const r of resources) {
      if (r.kind === "listen") {
        this.#listeners.set(r.id, listenUnix(r.path, { nonBlocking: false }));
        this.#createdPaths.push(r.path);
      } else {
        this.#pairs.set(r.id, socketPair({ nonBlocking: false }));
      }
    }
    let child: RunningChild;
    try {
      child = this.#spawn(p);
    } catch (e) {
      this.dropResources(resources);
      throw new LaunchError(`${p.name}: ${(e as Error).message}`);
    }
    // Stop order is reverse start order: keep QEMU last, so it stops before this back-end.
    const qemu = this.children.findIndex((c) => c.planned.role === "qemu");
    if (qemu >= 0 && qemu < this.children.length - 1) {
      this.children.splice(this.children.indexOf(child), 1);
      this.children.splice(qemu, 0, child);
    }
    try {
      await this.#ready(child);
    } catch (e) {
      await this.removeProcess(child);
      this.dropResources(resources);
      throw e;
    }
    return child;
  }

  /** mpq's end of a socketpair resource (e.g. to hand QEMU over QMP); null when it is gone. */
  pairEnd(resource: string, end: 0 | 1): OwnedFd | null {
    const fd = this.#pairs.get(resource)?.[end].fd;
    return fd && !fd.closed ? fd : null;
  }

  /** Closes what is left of hot-plug resources (sockets mpq still holds; bound paths removed). */
  dropResources(resources: Resource[]): void {
    for (const r of resources) {
      if (r.kind === "listen") {
        this.#listeners.get(r.id)?.fd.close();
        this.#listeners.delete(r.id);
        try {
          Deno.removeSync(r.path);
        } catch { /* gone */ }
      } else {
        const pair = this.#pairs.get(r.id);
        if (pair) { for (const s of pair) s.close(); }
        this.#pairs.delete(r.id);
      }
    }
  }

  /** Stops one child (hot-unplug, or a failed add) and forgets it. */
  async removeProcess(child: RunningChild): Promise<void> {
    await this.#stopChild(child, this.#opts.stopTimeoutMs ?? 5000);
    const i = this.children.indexOf(child);
    if (i >= 0) this.children.splice(i, 1);
    this.#log(child.planned.name, `pid ${child.process.pid} stopped (${child.process.status?.text ?? "?"})`);
  }

  #spawn(p: PlannedProcess): RunningChild {
    const found = resolveExecutable(p.argv[0]);
    const exe = found.startsWith("/") ? found : `${Deno.cwd()}/${found}`;
    const argv = withParentDeathSignal([exe, ...p.argv.slice(1)], { parentPid: getpid() });
    const env = { ...Deno.env.toObject(), ...p.env };
    const process = spawn(argv[0], argv, { fds: this.#fdsFor(p), env, newProcessGroup: p.ownProcessGroup });
    let resolve!: (s: ExitStatus) => void;
    const exited = new Promise<ExitStatus>((r) => (resolve = r));
    let reported = false;
    const check = (): ExitStatus | null => {
      if (reported) return process.status;
      const st = process.tryWait();
      if (!st) return null;
      reported = true;
      watch.remove();
      resolve(st);
      if (!child.stopping && !this.#stopped) this.#opts.onUnexpectedExit?.(child, st);
      return st;
    };
    const child: RunningChild = {
      planned: p,
      process,
      exited,
      stopping: false,
      check,
      startedAt: performance.now(),
    };
    const watch = this.#reactor.add(process.pidfd, { readable: true }, () => void check());
    this.children.push(child);
    this.#release(p);
    return child;
  }

  /** When each restartable process was restarted (for its limit). */
  readonly #restarts = new Map<string, number[]>();

  /**
   * A child failed: if its plan allows (restart on-failure, under its limit), starts it again
   * with the same fds and returns true; false when the VM must be torn down.
   */
  restart(child: RunningChild, status: ExitStatus): boolean {
    const p = child.planned;
    if (!p.restart || this.#stopped) return false;
    const now = performance.now();
    const times = (this.#restarts.get(p.name) ?? []).filter((t) => now - t < p.restart!.windowMs);
    if (times.length >= p.restart.limit) {
      this.#log(
        p.name,
        `${status.text}: restarted ${times.length} times in ${p.restart.windowMs / 1000} s already`,
      );
      return false;
    }
    times.push(now);
    this.#restarts.set(p.name, times);
    this.children.splice(this.children.indexOf(child), 1);
    const next = this.#spawn(p);
    this.#log(
      p.name,
      `${status.text}: restarted as pid ${next.process.pid} (${times.length} of ${p.restart.limit} in ${
        p.restart.windowMs / 1000
      } s)`,
    );
    return true;
  }

  /** Restarts of `name` within its window. */
  restarts(name: string): number {
    return this.#restarts.get(name)?.length ?? 0;
  }

  async #ready(child: RunningChild): Promise<void> {
    const p = child.planned;
    const r = p.ready;
    const exitedEarly = async () => {
      const st = await child.exited;
      return new LaunchError(`${p.name} (pid ${child.process.pid}) exited while starting: ${st.text}`);
    };
    switch (r.kind) {
      case "started":
        this.#log(p.name, `pid ${child.process.pid} started`);
        return;
      case "listening": {
        const bound = this.#opts.readyTimeoutMs ?? 20000;
        const t = performance.now();
        while (!isListening(r.path)) {
          if (child.process.status) throw await exitedEarly();
          if (performance.now() - t > bound) {
            throw new LaunchError(
              `${p.name} (pid ${child.process.pid}) did not listen on ${r.path} within ${bound} ms`,
            );
          }
          const d = delay(10);
          await d.promise;
        }
        this.#log(p.name, `pid ${child.process.pid} listening on ${r.path}`);
        return;
      }
      case "qmp-greeting": {
        const res = this.plan.resources.find((x) => x.id === r.resource);
        if (!res || res.kind !== "listen") {
          throw new LaunchError(`qmp resource ${r.resource} is not a listening socket`);
        }
        let qmp: QmpClient;
        try {
          qmp = QmpClient.connect(res.path, this.#reactor);
        } catch (e) {
          // mpq's own copy of the listener is closed: a refused connect means QEMU is gone.
          if (child.process.status || (await within(child.exited, 2000))) throw await exitedEarly();
          throw new LaunchError(`${p.name}: QMP connect to ${res.path} failed: ${(e as Error).message}`);
        }
        this.#qmp = qmp;
        void qmp.closed.then(() => {
          // Losing QMP to a protocol error while the VM runs is worth a line: teardown then falls
          // back to SIGTERM for QEMU, as after any QMP loss.
          const err = qmp.endError;
          if (err instanceof QmpProtocolError && !this.#stopped) {
            this.#log("qmp", `${err.message}; connection closed`);
          }
        });
        const outcome = await Promise.race([
          qmp.greeting.then((g) => ({ g }), (e: Error) => ({ e })),
          child.exited.then(() => ({ exited: true as const })),
        ]);
        if ("exited" in outcome) throw await exitedEarly();
        if ("e" in outcome) {
          if (!(outcome.e instanceof QmpProtocolError) && (await within(child.exited, 2000))) {
            throw await exitedEarly();
          }
          throw new LaunchError(`${p.name}: ${outcome.e.message}`);
        }
        this.#greeting = outcome.g;
        const v = outcome.g.version.qemu;
        this.#log(p.name, `pid ${child.process.pid} QMP ready (QEMU ${v.major}.${v.minor}.${v.micro})`);
        return;
      }
    }
  }

  /** Runs planned QMP commands in order; throws LaunchError naming the failed step. */
  async runQmp(commands: readonly PlannedQmpCommand[]): Promise<void> {
    const qmp = this.#qmp;
    if (!qmp) throw new LaunchError("QMP is not connected");
    for (const c of commands) {
      let result: unknown;
      try {
        result = await qmp.execute(c.execute, c.arguments);
      } catch (e) {
        // A closed connection means QEMU is ending: name its exit status rather than the socket error.
        // A protocol error is QEMU misbehaving while alive: name it as it is.
        const qemu = this.children.find((x) => x.planned.role === "qemu");
        const closed = !(e instanceof QmpError) && !(e instanceof QmpProtocolError);
        if (closed && qemu && (await within(qemu.exited, 2000))) {
          throw new LaunchError(
            `qemu (pid ${qemu.process.pid}) exited while starting: ${qemu.process.status?.text} (during QMP ${c.label})`,
          );
        }
        throw new LaunchError(`QMP ${c.label} (${c.execute}) failed: ${(e as Error).message}`);
      }
      if (c.expect && !matchesExpectation(result, c.expect)) {
        throw new LaunchError(
          `QMP ${c.label} (${c.execute}): expected ${JSON.stringify(c.expect)}, got ${
            JSON.stringify(result)
          }`,
        );
      }
      const text = c.execute === "cont"
        ? "cont -> guest running"
        : c.execute === "x-exit-preconfig"
        ? "x-exit-preconfig -> machine created"
        : `${c.execute}: ${summary(result)}`;
      if (c.execute !== "qmp_capabilities") this.#log(`qmp ${c.label}`, text);
    }
  }

  /**
   * Opens the sockets, starts every child in order (each ready before the next starts) and runs
   * the QMP managed start. On failure throws LaunchError; call stop() either way.
   */
  async start(): Promise<void> {
    if (this.#stopped) throw new LaunchError("the VM was already stopped");
    this.#open();
    for (const p of this.plan.processes) {
      // Teardown may have begun while we waited (a signal, a child's exit): start nothing more.
      if (this.#stopped) throw new LaunchError(`not starting ${p.name}: the VM is being torn down`);
      const child = this.#spawn(p);
      await this.#ready(child);
    }
    await this.runQmp(this.plan.qmp.startup);
    if (this.plan.incoming) await this.#migratedIn(this.plan.incoming);
    else if (this.plan.start === "run") this.#log("qmp", "guest running (started without -S)");
    await this.runQmp(this.plan.qmp.afterStart);
  }

  /**
   * A migration destination: waits (as long as it takes: the source decides when) until QEMU has
   * received the guest and runs it. A failed incoming migration ends QEMU, which the supervisor
   * reports.
   */
  async #migratedIn(uri: string): Promise<void> {
    this.#log("qmp incoming", `waiting for the migration on ${uri}`);
    const qmp = this.#qmp!;
    if (uri.startsWith(MPQ_UNIX_PREFIX)) await this.#acceptMigration(uri.slice(MPQ_UNIX_PREFIX.length), qmp);
    let announced = false;
    while (!this.#stopped) {
      const st = await qmp.execute("query-status") as { status?: string };
      if (st.status === "running") break;
      if (st.status !== "inmigrate" && !announced) {
        this.#log("qmp incoming", `receiving (${st.status})`);
        announced = true;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    if (this.#stopped) throw new LaunchError("the VM was torn down before the migration came in");
    this.#log("qmp incoming", "migration completed: guest running");
  }

  /**
   * `mpq-unix:PATH`: mpq listens on PATH (mode 0600) and hands QEMU (started with `-incoming defer`)
   * the source's connection: `getfd`, then `migrate-incoming fd:NAME`. QEMU needs no access to PATH.
   */
  async #acceptMigration(path: string, qmp: QmpClient): Promise<void> {
    const listener = listenUnix(path, { mode: 0o600 });
    this.#createdPaths.push(path);
    try {
      const sock = await new Promise<UnixSocket>((resolve, reject) => {
        const watch = this.#reactor.add(listener.fd, { readable: true }, () => {
          try {
            const s = listener.accept();
            if (!s) return;
            watch.remove();
            resolve(s);
          } catch (e) {
            watch.remove();
            reject(e);
          }
        });
      });
      try {
        await qmp.execute("getfd", { fdname: "migration" }, { fds: [sock.fd.dup()] });
      } finally {
        sock.close();
      }
      this.#log("qmp incoming", `the source connected: migrate-incoming fd:migration`);
      await qmp.execute("migrate-incoming", { uri: "fd:migration" });
    } finally {
      listener.close();
    }
  }

  async #stopChild(c: RunningChild, bound: number): Promise<void> {
    c.stopping = true;
    if (c.process.status) return;
    if (c.planned.role === "qemu" && this.#qmp && !this.#qmp.ended) {
      this.#qmp.execute("quit").catch(() => {});
      if (await within(c.exited, bound)) return;
    }
    if (c.planned.role === "remote") {
      // x-remote exits by itself when the proxy's connection closes (auto-shutdown).
      if (await within(c.exited, Math.min(bound, 1000))) return;
    }
    c.process.kill(Signal.SIGTERM);
    if (await within(c.exited, bound)) return;
    this.#log(c.planned.name, `did not stop on SIGTERM within ${bound} ms: SIGKILL`);
    c.process.kill(Signal.SIGKILL);
    await c.exited;
  }

  /** Stops every child in reverse start order, closes every socket and removes the runtime dir. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    const bound = this.#opts.stopTimeoutMs ?? 5000;
    for (const c of [...this.children].reverse()) {
      const already = c.check() !== null;
      await this.#stopChild(c, bound);
      const how = c.planned.role === "remote" && already
        ? "ended with its proxy"
        : already
        ? "had already exited"
        : "stopped";
      this.#log(c.planned.name, `pid ${c.process.pid} ${how} (${c.process.status?.text ?? "?"})`);
    }
    this.#qmp?.close();
    for (const l of this.#listeners.values()) l.fd.close();
    this.#listeners.clear();
    for (const [a, b] of this.#pairs.values()) {
      a.close();
      b.close();
    }
    this.#pairs.clear();
    for (const path of this.#createdPaths) {
      try {
        unlinkPath(path);
      } catch { /* gone */ }
    }
    try {
      Deno.removeSync(this.plan.runtimeDir, { recursive: true });
    } catch { /* not ours or gone */ }
  }
}
