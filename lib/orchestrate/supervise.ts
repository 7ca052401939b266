/**
 * Supervision: start a plan's VM, keep it running until a child exits, a signal arrives or the
 * caller is done, then tear everything down in reverse order and report an exit code.
 * @module
 */
import { type ExitStatus, Reactor } from "../../ffi/mod.ts";
import { ControlServer } from "../vhost/control.ts";
import { type RunningChild, Vm } from "./launch.ts";
import { Hotplug } from "./hotplug.ts";
import { migrate, type MigrationResult } from "./migration.ts";
import type { Plan } from "./plan.ts";

/** Options for runPlan. */
export interface RunOptions {
  /** Status lines (stdout for humans). */
  log: (line: string) => void;
  /** Error lines (stderr). */
  error: (line: string) => void;
  /**
   * Runs once the guest is running; its result (default 0) ends the VM with that exit code.
   * Without it the VM runs until a child exits or mpq gets SIGINT/SIGTERM.
   */
  whileRunning?: (vm: Vm) => Promise<number | void>;
  /** Bound for each teardown stage, ms (default 5000). */
  stopTimeoutMs?: number;
  /** After a child's unexpected exit, how long to let the others settle before naming the cause (default 1000). */
  settleMs?: number;
  /**
   * A JSON-lines control socket at this path (mode 0600; `mpq ctl PATH ...`): `status`, and
   * `migrate {"uri": ...}`, which moves the running guest to a destination started with
   * `--incoming` and, once it completed, tears this side down (exit 0).
   */
  controlPath?: string;
  /** Why this VM cannot migrate (migration.ts migrationBlockers): `migrate` is refused, naming them. */
  migrationBlockers?: readonly string[];
  /**
   * Service-manager state lines (sd_notify: `READY=1` once the guest runs, `STATUS=...` at each
   * stage, `STOPPING=1` when teardown begins). Default: none.
   */
  notify?: (state: string) => void;
  /** Enables `add` and `remove` on the control socket (hot-plug: see hotplug.ts). */
  hotplug?: { self: readonly string[]; qemu: string; ids: readonly string[] };
}

/** A child that exited while the VM was up. */
interface ChildExit {
  child: RunningChild;
  status: ExitStatus;
}

/**
 * The exit that caused the others: a back-end or remote process that failed (non-zero or killed)
 * before anything else, else QEMU, else the first one seen. A remote's exit 0 is its auto-shutdown
 * after QEMU closed the connection, never a cause.
 */
function rootCause(exits: readonly ChildExit[]): ChildExit {
  const failed = exits.find((e) => e.child.planned.role !== "qemu" && e.status.code !== 0);
  return failed ?? exits.find((e) => e.child.planned.role === "qemu") ?? exits[0];
}

type End =
  | { kind: "signal"; signal: string }
  | { kind: "exit"; child: RunningChild; status: ExitStatus; others: ChildExit[] }
  | { kind: "failed"; error: unknown }
  | { kind: "done"; code: number };

/**
 * Starts the VM of `plan` and supervises it. Exit code: 0 after SIGINT/SIGTERM, a guest shutdown
 * (QEMU exit 0) or a successful `whileRunning`; 1 when starting failed or a child exited unexpectedly.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { planTopology } from "./plan.ts";
 * import { matchesExpectation } from "./qmp.ts";
 * import { validateTopology } from "./topology.ts";
 *
 * const runtimeDir = Deno.makeTempDirSync({ prefix: "mpq-" }); // removed once every process has exited
 * const topology = validateTopology({ memory: "16M", console: "none" }); // qemu-system-x86_64, no guest OS
 * const plan = planTopology(topology, { runtimeDir, self: ["mpq"] });
 * const lines: string[] = [];
 * let status: unknown;
 * const code = await runPlan(plan, {
 *   log: (line) => lines.push(line), // `mpq orchestrate`: console.log and console.error
 *   error: (line) => lines.push(line),
 *   whileRunning: async (vm) => { // without it: runs until SIGINT/SIGTERM or a child exits
 *     status = await vm.qmp!.execute("query-status");
 *   },
 * });
 * assert.equal(code, 0);
 * assert.ok(matchesExpectation(status, { status: "running", running: true }));
 * assert.match(lines.at(-1)!, /every process of the VM has exited; exit 0$/);
 * ```
 */
export async function runPlan(plan: Plan, options: RunOptions): Promise<number> {
  const reactor = new Reactor();
  const running = reactor.run();
  let finish!: (e: End) => void;
  const exits: ChildExit[] = [];
  let settling = false;
  const ended = new Promise<End>((r) => (finish = r));
  const vm = new Vm(plan, reactor, {
    log: options.log,
    stopTimeoutMs: options.stopTimeoutMs,
    onUnexpectedExit: (child, status) => {
      const exited = { name: child.planned.name, pid: child.process.pid, status: status.text };
      // A back-end the topology lets restart (QEMU reconnects to it): the VM goes on.
      if (!settling && vm.restart(child, status)) {
        control?.publish("restarted", exited);
        return;
      }
      control?.publish("exited", exited);
      exits.push({ child, status });
      if (settling) return;
      settling = true;
      // One failure usually takes others down within moments (QEMU gives up when a back-end's socket
      // closes, a remote process exits with its proxy), and the order in which the kernel reports
      // them is not the causal one. Let the VM settle (bounded), then name the root cause.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const bound = new Promise<void>((r) => (timer = setTimeout(r, options.settleMs ?? 1000)));
      const rest = vm.children.filter((c) => c !== child).map((c) => c.exited);
      void Promise.race([Promise.all(rest), bound]).then(() => {
        clearTimeout(timer);
        for (const c of vm.children) c.check();
        const culprit = rootCause(exits);
        finish({ kind: "exit", ...culprit, others: exits.filter((e) => e !== culprit) });
      });
    },
  });
  reactor.onSignal("SIGINT", () => finish({ kind: "signal", signal: "SIGINT" }));
  reactor.onSignal("SIGTERM", () => finish({ kind: "signal", signal: "SIGTERM" }));
  let guestRunning = false;
  let migrating = false;
  const hotplug = options.hotplug
    ? new Hotplug({
      vm,
      self: options.hotplug.self,
      qemu: options.hotplug.qemu,
      log: (l) => options.log(`[${vm.elapsed()}s] ${"hotplug".padEnd(14)} ${l}`),
      changed: (what, id) => control?.publish(what, { id }),
    }, options.hotplug.ids)
    : null;
  const control = options.controlPath
    ? openControl(options.controlPath, reactor, vm, {
      log: options.log,
      notify: (st) => options.notify?.(st),
      hotplug,
      stop: () => setTimeout(() => finish({ kind: "signal", signal: "stop" }), 20),
      blockers: options.migrationBlockers ?? [],
      running: () => guestRunning,
      migrating: (on) => migrating = on,
      isMigrating: () => migrating,
      migrated: (r) => {
        options.log(
          `[${vm.elapsed()}s] ${
            "migrated".padEnd(14)
          } in ${r.totalTimeMs} ms (downtime ${r.downtimeMs} ms, ` +
            `${(r.transferredBytes / (1 << 20)).toFixed(1)} MiB sent): the guest runs on the destination`,
        );
        // After the reply has gone out.
        setTimeout(() => finish({ kind: "done", code: 0 }), 20);
      },
    })
    : null;
  if (control) {
    options.log(`[${vm.elapsed()}s] ${"control".padEnd(14)} mpq ctl ${control.path} status|migrate URI`);
  }

  const notify = options.notify ?? (() => {});
  let code = 1;
  let starting: Promise<void> | null = null;
  try {
    try {
      vm.preflight();
    } catch (e) {
      options.error(`${(e as Error).message}; nothing was started`);
      return 1;
    }
    notify(
      plan.incoming ? `STATUS=waiting for the incoming migration on ${plan.incoming}` : "STATUS=starting",
    );
    starting = vm.start();
    const first = await Promise.race([
      starting.then(() => null, (error) => ({ kind: "failed", error }) as End),
      ended,
    ]);
    let end: End;
    if (first === null) {
      guestRunning = true;
      control?.publish("running", { processes: vm.children.length });
      // QEMU's own events (SHUTDOWN, STOP, RESUME, DEVICE_DELETED, MIGRATION, ...) for subscribers.
      vm.qmp?.onEvent((e) => control?.publish("qmp", e));
      notify(`READY=1\nSTATUS=guest running (${vm.children.length} processes)`);
      options.log(
        `[${vm.elapsed()}s] ${"running".padEnd(14)} ${vm.children.length} process${
          vm.children.length === 1 ? "" : "es"
        }; operators: mpq qmp ${plan.qmp.operatorSocket} query-status`,
      );
      const work = options.whileRunning
        ? options.whileRunning(vm).then(
          (c) => ({ kind: "done", code: c ?? 0 }) as End,
          (error) => ({ kind: "failed", error }) as End,
        )
        : new Promise<End>(() => {});
      end = await Promise.race([ended, work]);
    } else if (first.kind === "failed" && settling) {
      end = await ended; // the start failed because a child exited: name the root cause
    } else {
      end = first;
    }
    switch (end.kind) {
      case "signal":
        options.log(`[${vm.elapsed()}s] ${end.signal.padEnd(14)} stopping the VM`);
        code = 0;
        break;
      case "done":
        code = end.code;
        break;
      case "failed":
        options.error(`${(end.error as Error).message ?? String(end.error)}; tearing the VM down`);
        code = 1;
        break;
      case "exit": {
        const c = end.child;
        if (c.planned.role === "qemu" && end.status.code === 0 && first === null) {
          options.log(`[${vm.elapsed()}s] ${"qemu".padEnd(14)} exited (exit 0): the guest shut down`);
          code = 0;
        } else {
          const then = end.others.map((o) =>
            `; then ${o.child.planned.name} (pid ${o.child.process.pid}): ${o.status.text}`
          );
          options.error(
            `${c.planned.name} (pid ${c.process.pid}) exited unexpectedly: ${end.status.text}${
              then.join("")
            }; tearing the VM down`,
          );
          code = 1;
        }
        break;
      }
    }
  } finally {
    notify(`STOPPING=1\nSTATUS=stopping (exit ${code})`);
    control?.publish("stopping", { code });
    control?.close();
    await vm.stop();
    if (starting) await starting.catch(() => {});
    reactor.stop();
    await running;
    reactor.close();
  }
  options.log(`[${vm.elapsed()}s] ${"done".padEnd(14)} every process of the VM has exited; exit ${code}`);
  return code;
}

interface ControlHooks {
  hotplug: Hotplug | null;
  /** Tears the VM down (after the reply went out). */
  stop: () => void;
  log: (line: string) => void;
  notify: (state: string) => void;
  blockers: readonly string[];
  running: () => boolean;
  isMigrating: () => boolean;
  migrating: (on: boolean) => void;
  migrated: (r: MigrationResult) => void;
}

/** The VM's control socket: `status` and `migrate`. */
function openControl(path: string, reactor: Reactor, vm: Vm, h: ControlHooks): ControlServer {
  return new ControlServer(path, {
    reactor,
    log: h.log,
    name: "mpq orchestrate",
    events: true,
    commands: {
      status: async () => {
        let guest: unknown = null;
        if (vm.qmp) {
          guest = await vm.qmp.execute("query-status").catch((e) => ({ error: (e as Error).message }));
        }
        const socketOf = (resource: string) => {
          const r = vm.plan.resources.find((x) => x.id === resource);
          return r?.kind === "listen" ? r.path : r ? `socketpair ${r.id}` : resource;
        };
        return {
          name: vm.plan.name,
          elapsed: Number(vm.elapsed()),
          guest,
          migrating: h.isMigrating(),
          qmp: vm.plan.qmp.operatorSocket,
          control: path,
          added: h.hotplug?.added ?? [],
          processes: vm.children.map((c) => ({
            name: c.planned.name,
            role: c.planned.role,
            pid: c.process.pid,
            state: c.check() ? "exited" : c.stopping ? "stopping" : "running",
            uptime: Number(((performance.now() - c.startedAt) / 1000).toFixed(2)),
            restarts: vm.restarts(c.planned.name),
            sockets: c.planned.fds.map((f) => `fd ${f.fd}: ${socketOf(f.resource)}`),
          })),
        };
      },
      add: async (args) => {
        if (!h.hotplug) throw new Error("this VM takes no hot-plug");
        if (!h.running()) throw new Error("the guest is not running yet");
        let device = args.device;
        if (typeof device === "string") {
          try {
            device = JSON.parse(device);
          } catch (e) {
            throw new Error(`device is not JSON: ${(e as Error).message}`);
          }
        }
        return await h.hotplug.add(device);
      },
      remove: async (args) => {
        if (!h.hotplug) throw new Error("this VM takes no hot-plug");
        await h.hotplug.remove(args.id, args.timeoutMs);
        return null;
      },
      stop: () => {
        h.log(`[${vm.elapsed()}s] ${"control".padEnd(14)} stop requested`);
        h.stop();
        return null;
      },
      qmp: async (args) => {
        if (!vm.qmp) throw new Error("QEMU's QMP is not connected");
        if (typeof args.execute !== "string") throw new Error(`qmp needs "execute" (a QMP command name)`);
        const a = args.arguments;
        if (a !== undefined && (typeof a !== "object" || a === null || Array.isArray(a))) {
          throw new Error(`qmp "arguments" must be a JSON object`);
        }
        return await vm.qmp.execute(args.execute, a as Record<string, unknown> | undefined);
      },
      migrate: async (args) => {
        const uri = args.uri;
        if (typeof uri !== "string") throw new Error(`migrate needs "uri" (tcp:HOST:PORT or unix:PATH)`);
        if (h.blockers.length > 0) {
          throw new Error(`this VM cannot migrate: ${h.blockers.join("; ")}`);
        }
        if (!h.running() || !vm.qmp) throw new Error("the guest is not running yet");
        if (h.isMigrating()) throw new Error("a migration is already running");
        h.migrating(true);
        h.notify(`STATUS=migrating to ${uri}`);
        h.log(`[${vm.elapsed()}s] ${"migrate".padEnd(14)} to ${uri}`);
        try {
          const r = await migrate(vm.qmp, uri, {
            progress: (line) => h.log(`[${vm.elapsed()}s] ${"migrate".padEnd(14)} ${line}`),
          });
          h.migrated(r);
          return r;
        } catch (e) {
          h.log(`[${vm.elapsed()}s] ${"migrate".padEnd(14)} ${(e as Error).message}; the guest runs on here`);
          h.notify(`STATUS=guest running (the migration to ${uri} failed)`);
          throw e;
        } finally {
          h.migrating(false);
        }
      },
    },
  });
}
