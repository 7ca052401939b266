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
}

type End =
  | { kind: "signal"; signal: string }
  | { kind: "exit"; child: RunningChild; status: ExitStatus }
  | { kind: "failed"; error: unknown }
  | { kind: "done"; code: number };

/**
 * Starts the VM of `plan` and supervises it. Exit code: 0 after SIGINT/SIGTERM, a guest shutdown
 * (QEMU exit 0) or a successful `whileRunning`; 1 when starting failed or a child exited unexpectedly.
 * @example
 * const code = await runPlan(plan, { log: console.log, error: console.error });
 */
export async function runPlan(plan: Plan, options: RunOptions): Promise<number> {
  const reactor = new Reactor();
  const running = reactor.run();
  let finish!: (e: End) => void;
  const ended = new Promise<End>((r) => (finish = r));
  const vm = new Vm(plan, reactor, {
    log: options.log,
    stopTimeoutMs: options.stopTimeoutMs,
    onUnexpectedExit: (child, status) => {
      // A remote process exits 0 by itself once its proxy's connection closes, i.e. when QEMU ends:
      // QEMU's own exit may be reported a moment later, so give it a bound before blaming the remote.
      const qemu = vm.children.find((c) => c.planned.role === "qemu");
      if (qemu && qemu !== child && child.planned.role === "remote" && status.code === 0) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        const bound = new Promise<void>((r) => (timer = setTimeout(r, 2000)));
        void Promise.race([qemu.exited, bound]).then(() => {
          clearTimeout(timer);
          const qs = qemu.check();
          finish(qs ? { kind: "exit", child: qemu, status: qs } : { kind: "exit", child, status });
        });
        return;
      }
      finish({ kind: "exit", child, status });
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
          options.error(
            `${c.planned.name} (pid ${c.process.pid}) exited unexpectedly: ${end.status.text}; tearing the VM down`,
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
