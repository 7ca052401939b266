/**
 * Pure planning: a validated topology -> the launch plan (processes, argv, env, fd maps, start order,
 * readiness checks, QMP sequence). Nothing here touches the system; launch.ts executes a plan.
 * @module
 */
import {
  type Drive,
  type QmpStep,
  type RemoteDevice,
  RESTART_LIMIT,
  RESTART_WINDOW_MS,
  type Topology,
} from "./topology.ts";
import { type DeviceSpec, formatDeviceArg } from "../vhost/device_spec.ts";

/** What the planner needs besides the topology (all plain values, so planning stays pure). */
export interface PlanContext {
  /** Private directory for the VM's sockets (created by launch, 0700). */
  runtimeDir: string;
  /** argv prefix that runs mpq itself (lib/cli/self.ts selfCommand()). */
  self: readonly string[];
  /** Start as a live migration's destination: QEMU waits with `-incoming URI`. */
  incoming?: string;
  /**
   * The programs of the vhost-user descriptors the topology names (descriptor name or type ->
   * binary), found by vhost_user_descriptors.ts before planning (planning reads no files).
   */
  descriptors?: Readonly<Record<string, string>>;
}

/** A listening UNIX socket the orchestrator creates at `path` before anything starts. */
export interface ListenResource {
  id: string;
  kind: "listen";
  path: string;
  purpose: string;
}

/** A connected socketpair the orchestrator creates; end 0 and end 1 go to different children. */
export interface SocketPairResource {
  id: string;
  kind: "socketpair";
  purpose: string;
}

/** Something the orchestrator opens and hands to children by fd. */
export type Resource = ListenResource | SocketPairResource;

/** One inherited fd of a child: child fd number <- resource (and socketpair end). */
export interface FdAssignment {
  fd: number;
  resource: string;
  end?: 0 | 1;
}

/** When a started child counts as ready. */
export type Readiness =
  /** Running is enough (its sockets are pre-opened or pre-connected by the orchestrator). */
  | { kind: "started"; reason: string }
  /** A UNIX socket at `path` is in the listening state (/proc/net/unix; never probed by connecting). */
  | { kind: "listening"; path: string }
  /** QEMU sent its QMP greeting on the monitor socket. */
  | { kind: "qmp-greeting"; resource: string };

/** A child process of the VM. */
export interface PlannedProcess {
  /** "ivshmem ivs0", "vhost vblk0", "remote lsi0", "qemu". */
  name: string;
  role: "ivshmem" | "vhost" | "remote" | "qemu";
  /** argv[0] is the program (looked up on PATH when it has no slash). */
  argv: string[];
  /** Environment added to mpq's own. */
  env: Record<string, string>;
  /** Exactly the fds the child gets besides stdio. */
  fds: FdAssignment[];
  ready: Readiness;
  /**
   * Its own process group, so a terminal's Ctrl-C reaches only mpq, which stops children in order.
   * False only for QEMU with a stdio console: it must stay in the terminal's foreground group to read
   * it; Ctrl-C then reaches both QEMU (signal=on: it exits 0, as with QEMU's own -serial stdio) and
   * mpq, which tears the rest down in order.
   */
  ownProcessGroup: boolean;
  /**
   * Restarted when it fails, with the same fds (mpq keeps its copies), at most `limit` times in
   * `windowMs`; absent: its failure tears the VM down.
   */
  restart?: { limit: number; windowMs: number };
}

/** One QMP command of the managed start. */
export interface PlannedQmpCommand {
  /** "capabilities", "step 1", "preconfig", "cont", "after 1". */
  label: string;
  execute: string;
  arguments?: Record<string, unknown>;
  expect?: Record<string, unknown>;
}

/** A socket someone else serves: it must be listening before anything starts. */
export interface ExternalSocket {
  path: string;
  purpose: string;
}

/** The whole launch plan. Processes start in order and stop in reverse. */
export interface Plan {
  name: string;
  runtimeDir: string;
  start: Topology["start"];
  /** A migration destination: QEMU runs the guest once the migration on this URI completed. */
  incoming?: string;
  resources: Resource[];
  external: ExternalSocket[];
  processes: PlannedProcess[];
  qmp: {
    /** The orchestrator's monitor (resource id). */
    resource: string;
    /** Operator monitor path (`mpq qmp PATH ...`). */
    operatorSocket: string;
    /** Run in order before the guest starts (the last ones start it). */
    startup: PlannedQmpCommand[];
    /** Run once the guest is running. */
    afterStart: PlannedQmpCommand[];
  };
  /** Files the debug console writes (the demo reads it). */
  debugcon?: string;
}

const MIB = 1024 * 1024;

/** QEMU's option-value escaping: a comma inside a value is written twice. */
export function qemuOptValue(v: string): string {
  return v.replaceAll(",", ",,");
}

function driveOpts(d: Drive, extra: string): string {
  return `file=${qemuOptValue(d.file)},format=${d.format}${extra}${d.readOnly ? ",readonly=on" : ""}`;
}

function qmpCommands(steps: QmpStep[], label: string): PlannedQmpCommand[] {
  return steps.map((s, i) => {
    const c: PlannedQmpCommand = { label: `${label} ${i + 1}`, execute: s.execute };
    if (s.arguments) c.arguments = s.arguments;
    if (s.expect) c.expect = s.expect;
    return c;
  });
}

/**
 * The `-machine x-remote` QEMU process of a remote device, its end of socketpair `pair` at fd 3
 * (at start, and for hot-plug).
 */
export function remoteProcess(d: RemoteDevice, qemu: string, pair: string): PlannedProcess {
  const argv = [d.qemu ?? qemu, "-machine", "x-remote", "-nodefaults", "-display", "none"];
  argv.push("-device", `${d.device},id=${d.id}`);
  d.drives.forEach((drv, i) => {
    argv.push("-drive", `id=${d.id}-drive${i},${driveOpts(drv, ",if=none")}`);
    argv.push("-device", `scsi-hd,id=${d.id}-hd${i},drive=${d.id}-drive${i},bus=${d.id}.0,scsi-id=${i}`);
  });
  argv.push("-object", `x-remote-object,id=robj-${d.id},devid=${d.id},fd=3`, ...d.extraArgs);
  return {
    name: `remote ${d.id}`,
    role: "remote",
    argv,
    env: {},
    fds: [{ fd: 3, resource: pair, end: 1 }],
    ready: { kind: "started", reason: "its socketpair end is connected before it starts" },
    ownProcessGroup: true,
  };
}

/** An mpq ivshmem server for device `id`, listening at `path` (at start, and for hot-plug). */
export function ivshmemProcess(
  id: string,
  size: string,
  vectors: number,
  path: string,
  self: readonly string[],
): PlannedProcess {
  return {
    name: `ivshmem ${id}`,
    role: "ivshmem",
    // A file in /dev/shm, unlinked at once: nothing is left behind even after SIGKILL.
    argv: [...self, "ivshmem", "-F", "-S", path, "-m", "/dev/shm", "-l", size, "-n", String(vectors)],
    env: {},
    fds: [],
    ready: { kind: "listening", path },
    ownProcessGroup: true,
  };
}

/**
 * Turns a topology into a launch plan. Pure: same input, same plan.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateTopology } from "./topology.ts";
 *
 * const topology = validateTopology({ devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }] });
 * const plan = planTopology(topology, { runtimeDir: "/tmp/mpq-x", self: ["mpq"] });
 * assert.deepEqual(plan.processes.map((p) => p.name), ["remote lsi0", "qemu"]); // start order
 * ```
 */
export function planTopology(t: Topology, ctx: PlanContext): Plan {
  const dir = ctx.runtimeDir.replace(/\/+$/, "");
  const resources: Resource[] = [];
  const external: ExternalSocket[] = [];
  const ivshmemServers: PlannedProcess[] = [];
  const vhostSpecs: DeviceSpec[] = [];
  /** Whether every mpq-served vhost device may be restarted (then so may their process). */
  let vhostRestart = true;
  const vhostFds: FdAssignment[] = [];
  const remotes: PlannedProcess[] = [];
  /** Other back-ends mpq starts: qemu-storage-daemon, vhost-user programs. */
  const others: PlannedProcess[] = [];
  const qemuDevArgs: string[] = [];
  const qemuFds: FdAssignment[] = [
    { fd: 3, resource: "qmp" },
    { fd: 4, resource: "qmp-operator" },
  ];
  const operatorSocket = t.qmpSocket ?? `${dir}/qmp-operator.sock`;
  resources.push(
    { id: "qmp", kind: "listen", path: `${dir}/qmp.sock`, purpose: "QMP monitor of mpq" },
    { id: "qmp-operator", kind: "listen", path: operatorSocket, purpose: "QMP monitor for operators" },
  );
  let nextQemuFd = 5;

  for (const d of t.devices) {
    switch (d.type) {
      case "remote": {
        const pair = `remote-${d.id}`;
        resources.push({ id: pair, kind: "socketpair", purpose: `proxy <-> remote ${d.id}` });
        const fd = nextQemuFd++;
        qemuFds.push({ fd, resource: pair, end: 0 });
        qemuDevArgs.push("-device", `x-pci-proxy-dev,id=${d.id},fd=${fd}`);
        remotes.push(remoteProcess(d, t.qemu, pair));
        break;
      }
      case "vhost-user": {
        let path: string;
        if ("socket" in d.backend) {
          path = d.backend.socket;
          external.push({ path, purpose: `vhost-user back-end of ${d.id}` });
        } else {
          path = `${dir}/vhost-${d.id}.sock`;
          const res = `vhost-${d.id}`;
          resources.push({ id: res, kind: "listen", path, purpose: `vhost-user socket of ${d.id}` });
          let argv: string[];
          if ("command" in d.backend) argv = [...d.backend.command];
          else {
            const binary = ctx.descriptors?.[d.backend.descriptor];
            if (!binary) {
              throw new Error(`${d.id}: descriptor ${JSON.stringify(d.backend.descriptor)} was not resolved`);
            }
            argv = [binary, ...d.backend.args];
          }
          // The vhost-user back-end program conventions: a listening socket as --fd.
          argv.push("--fd=3");
          others.push({
            name: `vhost-user ${d.id}`,
            role: "vhost",
            argv,
            env: {},
            fds: [{ fd: 3, resource: res }],
            ready: { kind: "started", reason: "its listening socket is pre-opened: QEMU's connect queues" },
            ownProcessGroup: true,
          });
        }
        qemuDevArgs.push("-chardev", `socket,id=chr-${d.id},path=${qemuOptValue(path)}`);
        const props = Object.entries(d.properties).map(([k, v]) =>
          `,${k}=${typeof v === "boolean" ? (v ? "on" : "off") : qemuOptValue(String(v))}`
        ).join("");
        qemuDevArgs.push("-device", `${d.device},id=${d.id},chardev=chr-${d.id}${props}`);
        break;
      }
      case "vhost-user-blk":
      case "vhost-user-rng": {
        let path: string;
        if ("qsd" in d.backend) {
          const q = d.backend.qsd;
          path = `${dir}/vhost-${d.id}.sock`;
          const res = `vhost-${d.id}`;
          resources.push({ id: res, kind: "listen", path, purpose: `vhost-user socket of ${d.id}` });
          const ro = q.readOnly ? ",read-only=on" : "";
          others.push({
            name: `qsd ${d.id}`,
            role: "vhost",
            argv: [
              q.binary,
              "--blockdev",
              `driver=file,node-name=file-${d.id},filename=${qemuOptValue(q.file)}${ro}`,
              "--blockdev",
              `driver=${q.format},node-name=disk-${d.id},file=file-${d.id}${ro}`,
              "--export",
              `type=vhost-user-blk,id=export-${d.id},node-name=disk-${d.id},addr.type=fd,addr.str=3,` +
              `writable=${q.readOnly ? "off" : "on"},num-queues=${
                (d as { numQueues?: number }).numQueues ?? 1
              }`,
            ],
            env: {},
            fds: [{ fd: 3, resource: res }],
            ready: { kind: "started", reason: "its listening socket is pre-opened: QEMU's connect queues" },
            ownProcessGroup: true,
          });
        } else if ("socket" in d.backend) {
          path = d.backend.socket;
          external.push({ path, purpose: `vhost-user back-end of ${d.id}` });
        } else {
          path = `${dir}/vhost-${d.id}.sock`;
          const res = `vhost-${d.id}`;
          resources.push({ id: res, kind: "listen", path, purpose: `vhost-user socket of ${d.id}` });
          // All of the VM's mpq-served vhost devices share one `mpq vhost serve` (fds 3, 4, ...).
          const fd = 3 + vhostFds.length;
          vhostFds.push({ fd, resource: res });
          if (d.type === "vhost-user-blk") {
            const m = (d.backend as { mpq: { file: string; readOnly: boolean; numQueues?: number } }).mpq;
            vhostSpecs.push({
              type: "blk",
              id: d.id,
              listen: { fd },
              file: m.file,
              readOnly: m.readOnly,
              serial: "",
              blkSize: 512,
              numQueues: m.numQueues ?? d.numQueues ?? 1,
              direct: false,
              writeback: false,
              engine: "auto",
              ioThreads: 1,
            });
          } else {
            vhostSpecs.push({ type: "rng", id: d.id, listen: { fd } });
          }
        }
        const restart = d.type === "vhost-user-blk" && d.restart === "on-failure";
        if ("mpq" in d.backend && !restart) vhostRestart = false;
        // reconnect=1: QEMU reconnects to a restarted back-end (once a second).
        qemuDevArgs.push(
          "-chardev",
          `socket,id=chr-${d.id},path=${qemuOptValue(path)}${restart ? ",reconnect=1" : ""}`,
        );
        if (d.type === "vhost-user-blk") {
          qemuDevArgs.push(
            "-device",
            `vhost-user-blk-pci,id=${d.id},chardev=chr-${d.id},num-queues=${d.numQueues ?? 1}`,
          );
        } else {
          qemuDevArgs.push("-device", `vhost-user-rng-pci,id=${d.id},chardev=chr-${d.id}`);
        }
        break;
      }
      case "ivshmem": {
        let path: string;
        if ("socket" in d.server) {
          path = d.server.socket;
          external.push({ path, purpose: `ivshmem server of ${d.id}` });
        } else {
          path = `${dir}/ivshmem-${d.id}.sock`;
          ivshmemServers.push(ivshmemProcess(d.id, d.server.mpq.size, d.vectors, path, ctx.self));
        }
        qemuDevArgs.push("-chardev", `socket,id=chr-${d.id},path=${qemuOptValue(path)}`);
        qemuDevArgs.push("-device", `ivshmem-doorbell,id=${d.id},chardev=chr-${d.id},vectors=${d.vectors}`);
        break;
      }
    }
  }

  const servers: PlannedProcess[] = [];
  if (vhostSpecs.length > 0) {
    servers.push({
      name: `vhost ${vhostSpecs.map((s) => s.id).join(",")}`,
      role: "vhost",
      // Its control socket: devices hot-plugged later are added to this same process.
      argv: [
        ...ctx.self,
        "vhost",
        "serve",
        "--control",
        `${dir}/vhost.ctl`,
        ...vhostSpecs.flatMap((s) => ["--device", formatDeviceArg(s)]),
      ],
      env: {},
      fds: vhostFds,
      ready: { kind: "started", reason: "its listening sockets are pre-opened: QEMU's connects queue" },
      ownProcessGroup: true,
      ...(vhostRestart ? { restart: { limit: RESTART_LIMIT, windowMs: RESTART_WINDOW_MS } } : {}),
    });
  }

  const q = [t.qemu, "-name", t.name, "-machine", t.machine, "-accel", t.accel, "-smp", String(t.cpus)];
  q.push("-m", `${t.memory / MIB}M`);
  q.push("-object", `memory-backend-memfd,id=mem,size=${t.memory},share=on`, "-numa", "node,memdev=mem");
  q.push("-nodefaults", "-display", "none");
  q.push("-chardev", "socket,id=mon,fd=3,server=on,wait=off", "-mon", "chardev=mon,mode=control");
  q.push("-chardev", "socket,id=mon-op,fd=4,server=on,wait=off", "-mon", "chardev=mon-op,mode=control");
  if (t.console === "stdio") q.push("-chardev", "stdio,id=con0,signal=on", "-serial", "chardev:con0");
  else if (typeof t.console === "object") {
    q.push("-chardev", `file,id=con0,path=${qemuOptValue(t.console.file)}`, "-serial", "chardev:con0");
  }
  if (t.debugcon) q.push("-debugcon", `file:${t.debugcon}`, "-global", "isa-debugcon.iobase=0x402");
  if (t.kernel) q.push("-kernel", t.kernel);
  if (t.initrd) q.push("-initrd", t.initrd);
  if (t.append) q.push("-append", t.append);
  for (const d of t.disks) q.push("-drive", driveOpts(d, ",if=virtio"));
  if (t.start === "paused" || t.start === "preconfig-paused") q.push("-S");
  if (t.start === "preconfig" || t.start === "preconfig-paused") q.push("--preconfig");
  // mpq-unix:PATH: mpq listens and hands QEMU the connection (migrate-incoming fd:NAME).
  if (ctx.incoming) q.push("-incoming", ctx.incoming.startsWith("mpq-unix:") ? "defer" : ctx.incoming);
  q.push(...qemuDevArgs, ...t.extraArgs);

  const startup: PlannedQmpCommand[] = [
    { label: "capabilities", execute: "qmp_capabilities" },
    ...qmpCommands(t.steps, "step"),
  ];
  if (t.start === "preconfig" || t.start === "preconfig-paused") {
    startup.push({ label: "preconfig", execute: "x-exit-preconfig" });
  }
  if (t.start === "paused" || t.start === "preconfig-paused") {
    startup.push({ label: "cont", execute: "cont" });
  }

  const plan: Plan = {
    name: t.name,
    runtimeDir: dir,
    start: t.start,
    ...(ctx.incoming ? { incoming: ctx.incoming } : {}),
    resources,
    external,
    processes: [
      ...ivshmemServers,
      ...servers,
      ...others,
      ...remotes,
      {
        name: "qemu",
        role: "qemu",
        argv: q,
        env: {},
        fds: qemuFds,
        ready: { kind: "qmp-greeting", resource: "qmp" },
        ownProcessGroup: t.console !== "stdio",
      },
    ],
    qmp: { resource: "qmp", operatorSocket, startup, afterStart: qmpCommands(t.afterStart, "after") },
  };
  if (t.debugcon) plan.debugcon = t.debugcon;
  return plan;
}

/** Quotes one word for a POSIX shell when it needs it. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * A command line as shell text, one option (and its value) per line with backslash continuations.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(formatCommand(["qemu", "-m", "512M", "-S"], ""), ["qemu \\", "  -m 512M \\", "  -S"]);
 * ```
 */
export function formatCommand(argv: readonly string[], indent: string): string[] {
  const groups: string[][] = [];
  const head = [argv[0]];
  let i = 1;
  while (i < argv.length && !argv[i].startsWith("-")) head.push(argv[i++]);
  groups.push(head);
  while (i < argv.length) {
    const g = [argv[i++]];
    if (g[0].startsWith("-") && !g[0].includes("=") && i < argv.length && !argv[i].startsWith("-")) {
      g.push(argv[i++]);
    }
    groups.push(g);
  }
  return groups.map((g, n) =>
    `${indent}${n === 0 ? "" : "  "}${g.map(shellQuote).join(" ")}${n < groups.length - 1 ? " \\" : ""}`
  );
}

function describeFd(plan: Plan, a: FdAssignment): string {
  const r = plan.resources.find((x) => x.id === a.resource);
  if (!r) return `${a.resource} (missing resource)`;
  if (r.kind === "listen") return `listening socket ${r.path} (${r.purpose})`;
  return `socketpair ${r.id} end ${a.end} (${r.purpose})`;
}

function describeReady(r: Readiness): string {
  switch (r.kind) {
    case "started":
      return `started (${r.reason})`;
    case "listening":
      return `listening on ${r.path}`;
    case "qmp-greeting":
      return "QMP greeting received";
  }
}

/** The plan for humans: start order, command lines (shell-quoted), fds and readiness. */
export function formatPlan(plan: Plan): string {
  const out: string[] = [];
  out.push(`Plan for VM "${plan.name}" (start: ${plan.start}); sockets in ${plan.runtimeDir}/`);
  out.push("");
  out.push("Opened by mpq before anything starts:");
  for (const r of plan.resources) {
    out.push(
      r.kind === "listen"
        ? `  ${r.id.padEnd(16)} listen ${r.path}  (${r.purpose})`
        : `  ${r.id.padEnd(16)} socketpair  (${r.purpose})`,
    );
  }
  for (const e of plan.external) out.push(`  must already listen: ${e.path}  (${e.purpose})`);
  out.push("");
  out.push("Start order (each child gets exactly these fds; every child dies with mpq):");
  plan.processes.forEach((p, i) => {
    out.push(`  ${i + 1}. ${p.name}`);
    out.push(...formatCommand(p.argv, "     "));
    for (const a of p.fds) out.push(`     fd ${a.fd} <- ${describeFd(plan, a)}`);
    out.push(`     ready when: ${describeReady(p.ready)}`);
    if (p.restart) {
      out.push(
        `     restarted when it fails, at most ${p.restart.limit} times in ${p.restart.windowMs / 1000} s`,
      );
    }
  });
  out.push("");
  out.push("QMP (one connection to qmp.sock, no retries):");
  for (const c of [...plan.qmp.startup, ...plan.qmp.afterStart]) {
    const args = c.arguments ? ` ${JSON.stringify(c.arguments)}` : "";
    const exp = c.expect ? `  expect ${JSON.stringify(c.expect)}` : "";
    out.push(`  ${c.label.padEnd(14)} ${c.execute}${args}${exp}`);
  }
  out.push(`  operators: mpq qmp ${plan.qmp.operatorSocket} query-status`);
  out.push("");
  out.push("Stop order: the reverse (QMP quit, then SIGTERM, then SIGKILL after a bound).");
  return out.join("\n");
}
