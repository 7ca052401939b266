/**
 * Supervision: start a plan's VM, keep it running until a child exits, a signal arrives or the
 * caller is done, then tear everything down in reverse order and report an exit code.
 * @module
 */
import { type ExitStatus, Reactor } from "../../ffi/mod.ts";
import { type RunningChild, Vm } from "./launch.ts";
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

  let code = 1;
  let starting: Promise<void> | null = null;
  try {
    try {
      vm.preflight();
    } catch (e) {
      options.error(`${(e as Error).message}; nothing was started`);
      return 1;
    }
    starting = vm.start();
    const first = await Promise.race([
      starting.then(() => null, (error) => ({ kind: "failed", error }) as End),
      ended,
    ]);
    let end: End;
    if (first === null) {
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
    await vm.stop();
    if (starting) await starting.catch(() => {});
    reactor.stop();
    await running;
    reactor.close();
  }
  options.log(`[${vm.elapsed()}s] ${"done".padEnd(14)} every process of the VM has exited; exit ${code}`);
  return code;
}
