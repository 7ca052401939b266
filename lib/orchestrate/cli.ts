/**
 * `mpq orchestrate` and `mpq qmp`: command-line entry points.
 * @module
 */
import { parseArgs } from "node:util";
import { Reactor } from "../../ffi/mod.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import { sdNotify } from "../cli/sd_notify.ts";
import { selfCommand } from "../cli/self.ts";
import { DEMO_INTRO, demoTopology, watchDemo } from "./demo.ts";
import { incomingProblem, migrationBlockers } from "./migration.ts";
import { formatPlan, planTopology } from "./plan.ts";
import {
  descriptorDirs,
  type DescriptorFile,
  pickDescriptor,
  readDescriptorFiles,
} from "./vhost_user_descriptors.ts";
import { QmpClient, QmpClosedError, QmpError } from "./qmp.ts";
import { runPlan } from "./supervise.ts";
import { parseTopology, type Topology, TopologyError } from "./topology.ts";

/** Usage of `mpq orchestrate`. */
export const ORCHESTRATE_USAGE = `Usage: mpq orchestrate TOPOLOGY.json [--incoming URI] [--dry-run [--json]]
       mpq orchestrate --demo [--dry-run [--json]]

Launches one VM as several processes from a JSON topology (QEMU multi-process remote devices,
vhost-user back-ends, ivshmem servers), runs its QMP managed start, and supervises it: any child
exiting unexpectedly tears the VM down in reverse order (exit 1, naming the child); SIGINT/SIGTERM
tear it down and exit 0; if mpq is killed, every child dies with it.

Options:
  --demo           a built-in topology: a remote lsi53c895a seen by the firmware (no files needed)
  --dry-run        print the launch plan (processes, argv, fds, start order, QMP steps); start nothing
  --json           with --dry-run: the plan as JSON
  --stop-timeout MS  bound for each teardown stage (QMP quit, SIGTERM) before the next (default 5000)
  --incoming URI   be a live migration's destination (tcp:HOST:PORT or unix:PATH, where QEMU
                   listens; mpq-unix:PATH, where mpq listens and hands QEMU the connection): the
                   back-ends start, QEMU waits with -incoming, the guest runs once the source migrated
                   it (the source: mpq ctl CONTROL-SOCKET migrate tcp:... or unix:PATH)
  -h, --help       this text

The control socket (printed at start, in the runtime directory) takes \`mpq ctl SOCKET status\` and
\`mpq ctl SOCKET migrate URI\`.`;

/** Usage of `mpq qmp`. */
export const QMP_USAGE = `Usage: mpq qmp SOCKET COMMAND [JSON-ARGS] [--greeting]

Connects to a QMP monitor socket, negotiates capabilities, runs one command and prints its result
as JSON. Exit 1 with the error class and description if QEMU refuses the command.
  mpq qmp /tmp/mpq-vm-x/qmp-operator.sock query-status
  mpq qmp SOCK device_del '{"id": "lsi0"}'

Options:
  --greeting       also print QEMU's greeting (to stderr)
  -h, --help       this text`;

function tmpBase(): string {
  return (Deno.env.get("TMPDIR") ?? "/tmp").replace(/\/+$/, "");
}

/** `mpq orchestrate ...`; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        demo: { type: "boolean" },
        "dry-run": { type: "boolean" },
        json: { type: "boolean" },
        "stop-timeout": { type: "string" },
        incoming: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, ORCHESTRATE_USAGE);
  }
  const v = parsed.values;
  if (v.help) {
    console.log(ORCHESTRATE_USAGE);
    return 0;
  }
  const pos = parsed.positionals;
  if (v.demo && pos.length > 0) {
    throw new UsageError(`--demo takes no topology file: got ${pos[0]}`, ORCHESTRATE_USAGE);
  }
  if (!v.demo && pos.length !== 1) {
    throw new UsageError(
      pos.length === 0
        ? "a topology file (or --demo) is required"
        : `one topology file expected: got ${pos.join(" ")}`,
      ORCHESTRATE_USAGE,
    );
  }
  if (v.json && !v["dry-run"]) throw new UsageError("--json goes with --dry-run", ORCHESTRATE_USAGE);
  let stopTimeoutMs: number | undefined;
  if (v["stop-timeout"] !== undefined) {
    stopTimeoutMs = Number(v["stop-timeout"]);
    if (!Number.isInteger(stopTimeoutMs) || stopTimeoutMs < 1 || stopTimeoutMs > 600000) {
      throw new UsageError(
        `--stop-timeout must be 1..600000 ms: got ${v["stop-timeout"]}`,
        ORCHESTRATE_USAGE,
      );
    }
  }

  // The topology is validated before anything exists: an invalid one starts nothing.
  let makeTopology: (dir: string) => Topology;
  if (v.demo) {
    makeTopology = demoTopology;
  } else {
    let text: string;
    try {
      text = Deno.readTextFileSync(pos[0]);
    } catch (e) {
      throw new InputError(`cannot read topology ${pos[0]}: ${(e as Error).message}`);
    }
    let topology: Topology;
    try {
      topology = parseTopology(text, pos[0]);
    } catch (e) {
      if (e instanceof TopologyError) throw new InputError(`${pos[0]}: ${e.message}`);
      throw e;
    }
    makeTopology = () => topology;
  }
  // What the checks below need of the topology (the runtime directory only changes paths).
  const probe = makeTopology(`${tmpBase()}/mpq-X`);
  const name = probe.name;
  const self = selfCommand();
  // Installed vhost-user back-ends named by descriptor: resolved now, so planning reads no files.
  const descriptors: Record<string, string> = {};
  let descriptorFiles: DescriptorFile[] | null = null;
  probe.devices.forEach((d, i) => {
    if (d.type !== "vhost-user" || !("descriptor" in d.backend)) return;
    const wanted = d.backend.descriptor;
    descriptorFiles ??= readDescriptorFiles(descriptorDirs(Deno.env.toObject()));
    try {
      descriptors[wanted] = pickDescriptor(wanted, descriptorFiles).binary;
    } catch (e) {
      throw new InputError(
        `${pos[0] ?? "topology"}: devices[${i}].backend.descriptor: ${(e as Error).message}`,
      );
    }
  });
  const incoming = v.incoming;
  const blockers = migrationBlockers(probe);
  if (incoming !== undefined) {
    const problem = incomingProblem(incoming, true);
    if (problem) throw new UsageError(`--incoming: ${problem}`, ORCHESTRATE_USAGE);
    if (v.demo) throw new UsageError("--incoming goes with a topology file, not --demo", ORCHESTRATE_USAGE);
    if (probe.start !== "run") {
      throw new InputError(
        `${pos[0]}: start: --incoming needs "run" (the guest runs once migrated in): got "${probe.start}"`,
      );
    }
    if (blockers.length > 0) {
      throw new InputError(`${pos[0]}: cannot be a migration destination: ${blockers.join("; ")}`);
    }
  }

  if (v["dry-run"]) {
    const plan = planTopology(makeTopology(`${tmpBase()}/mpq-${name}-XXXXXX`), {
      runtimeDir: `${tmpBase()}/mpq-${name}-XXXXXX`,
      self,
      incoming,
      descriptors,
    });
    console.log(v.json ? JSON.stringify(plan, null, 2) : formatPlan(plan));
    return 0;
  }

  const runtimeDir = Deno.makeTempDirSync({ prefix: `mpq-${name}-` });
  const topology = makeTopology(runtimeDir);
  const plan = planTopology(topology, { runtimeDir, self, incoming, descriptors });
  if (v.demo) console.log(DEMO_INTRO);
  const log = (l: string) => console.log(l);
  return await runPlan(plan, {
    log,
    error: (l) => console.error(`mpq orchestrate: ${l}`),
    stopTimeoutMs,
    whileRunning: v.demo ? (vm) => watchDemo(vm, { log }) : undefined,
    controlPath: topology.control ?? `${runtimeDir}/control.sock`,
    migrationBlockers: blockers,
    notify: (state) => sdNotify(state, (l) => console.error(l)),
    hotplug: { self, qemu: topology.qemu, ids: topology.devices.map((d) => d.id) },
  });
}

/** `mpq qmp SOCKET COMMAND [JSON-ARGS]`; returns the exit code. */
export async function qmpMain(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: { greeting: { type: "boolean" }, help: { type: "boolean", short: "h" } },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, QMP_USAGE);
  }
  if (parsed.values.help) {
    console.log(QMP_USAGE);
    return 0;
  }
  const [socket, command, json, ...extra] = parsed.positionals;
  if (!socket || !command) throw new UsageError("SOCKET and COMMAND are required", QMP_USAGE);
  if (extra.length > 0) throw new UsageError(`unexpected argument: ${extra[0]}`, QMP_USAGE);
  let cmdArgs: Record<string, unknown> | undefined;
  if (json !== undefined) {
    let a: unknown;
    try {
      a = JSON.parse(json);
    } catch (e) {
      throw new UsageError(`JSON-ARGS is not valid JSON: ${(e as Error).message}`, QMP_USAGE);
    }
    if (typeof a !== "object" || a === null || Array.isArray(a)) {
      throw new UsageError(`JSON-ARGS must be a JSON object: got ${json}`, QMP_USAGE);
    }
    cmdArgs = a as Record<string, unknown>;
  }
  const reactor = new Reactor();
  const running = reactor.run();
  let qmp: QmpClient | null = null;
  try {
    try {
      qmp = QmpClient.connect(socket, reactor);
    } catch (e) {
      throw new InputError(`cannot connect to QMP socket ${socket}: ${(e as Error).message}`);
    }
    try {
      const greeting = await qmp.greeting;
      if (parsed.values.greeting) console.error(JSON.stringify({ QMP: greeting }, null, 2));
      await qmp.execute("qmp_capabilities");
    } catch (e) {
      // QEMU went away or broke the protocol before our command: an error naming it, not a crash.
      if (e instanceof QmpClosedError || e instanceof QmpError) throw new InputError(e.message);
      throw e;
    }
    try {
      const result = await qmp.execute(command, cmdArgs);
      console.log(JSON.stringify(result ?? {}, null, 2));
      return 0;
    } catch (e) {
      console.error(`mpq qmp: ${(e as Error).message}`);
      return 1;
    }
  } finally {
    qmp?.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}
