/**
 * `mpq ctl SOCKET COMMAND [ARGS] [--json]`: the client of `mpq orchestrate`'s control socket.
 * @module
 */
import { parseArgs } from "node:util";
import { controlRequest } from "../cli/control_client.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import { incomingProblem } from "./migration.ts";

/** Usage of `mpq ctl`. */
export const CTL_USAGE = `Usage: mpq ctl SOCKET status|stop|events [--json]
       mpq ctl SOCKET add DEVICE-JSON [--json]
       mpq ctl SOCKET remove ID [--json]
       mpq ctl SOCKET qmp COMMAND [JSON-ARGS] [--json]
       mpq ctl SOCKET migrate URI [--json]

Talks to a running \`mpq orchestrate\` through its control socket (printed at its start).

  status         the guest's run state and every process of the VM (role, pid, state, restarts)
  add DEVICE     hot-plug a device, given as a topology device object, e.g.
                 '{"type": "vhost-user-blk", "id": "vblk9", "backend": {"mpq": {"file": "/d.img"}}}'
                 (vhost-user-blk, vhost-user-rng, remote, ivshmem); a failed add leaves nothing behind
  remove ID      hot-unplug a device added with add (waits for the guest to release it)
  qmp CMD [ARGS] one QMP command on the VM's monitor (ARGS: a JSON object)
  events         print the VM's events as they happen (a process exited or was restarted, a device
                 was added or removed, QEMU's QMP events, stopping) until the VM stops
  stop           tear the VM down in order (as SIGTERM)
  migrate URI    live-migrate the guest to a destination started with
                 \`mpq orchestrate TOPOLOGY --incoming URI\` (tcp:HOST:PORT or unix:PATH); waits until
                 it completed, then the source tears itself down. Progress is in the source's log.
  --json         print the reply as JSON

Exit 0 when the command succeeded, 1 with the reason when it did not.`;

/** `mpq ctl ...`; returns the exit code. */
export async function ctlMain(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: { json: { type: "boolean" }, help: { type: "boolean", short: "h" } },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, CTL_USAGE);
  }
  if (parsed.values.help) {
    console.log(CTL_USAGE);
    return 0;
  }
  const [socket, cmd, ...rest] = parsed.positionals;
  if (!socket || !cmd) throw new UsageError("SOCKET and COMMAND are required", CTL_USAGE);
  let req: Record<string, unknown> = {};
  if (cmd === "events") {
    if (rest.length > 0) throw new UsageError(`events takes no arguments: got ${rest.join(" ")}`, CTL_USAGE);
    return await followEvents(socket, !!parsed.values.json);
  }
  if (cmd === "status") {
    if (rest.length > 0) throw new UsageError(`status takes no arguments: got ${rest.join(" ")}`, CTL_USAGE);
  } else if (cmd === "stop") {
    if (rest.length > 0) throw new UsageError(`stop takes no arguments: got ${rest.join(" ")}`, CTL_USAGE);
  } else if (cmd === "add") {
    if (rest.length !== 1) throw new UsageError("add takes one DEVICE-JSON", CTL_USAGE);
    let device: unknown;
    try {
      device = JSON.parse(rest[0]);
    } catch (e) {
      throw new UsageError(`add: DEVICE-JSON is not JSON: ${(e as Error).message}`, CTL_USAGE);
    }
    req = { device };
  } else if (cmd === "remove") {
    if (rest.length !== 1) throw new UsageError("remove takes one ID", CTL_USAGE);
    req = { id: rest[0] };
  } else if (cmd === "qmp") {
    if (rest.length < 1 || rest.length > 2) throw new UsageError("qmp takes COMMAND [JSON-ARGS]", CTL_USAGE);
    req = { execute: rest[0] };
    if (rest[1] !== undefined) {
      try {
        req.arguments = JSON.parse(rest[1]);
      } catch (e) {
        throw new UsageError(`qmp: JSON-ARGS is not JSON: ${(e as Error).message}`, CTL_USAGE);
      }
    }
  } else if (cmd === "migrate") {
    if (rest.length !== 1) throw new UsageError("migrate takes one URI", CTL_USAGE);
    const problem = incomingProblem(rest[0]);
    if (problem) throw new UsageError(`migrate: ${problem}`, CTL_USAGE);
    req = { uri: rest[0] };
  } else {
    throw new UsageError(
      `unknown command ${JSON.stringify(cmd)} (status, events, add, remove, qmp, stop, migrate)`,
      CTL_USAGE,
    );
  }
  const reply = await controlRequest(socket, cmd, req);
  if (parsed.values.json) {
    console.log(JSON.stringify(reply));
    return reply.ok ? 0 : 1;
  }
  if (!reply.ok) {
    console.error(`mpq ctl: ${cmd}: ${reply.error}`);
    return 1;
  }
  const r = reply.result as Record<string, unknown>;
  if (cmd === "add") {
    console.log(`added ${r.type} ${r.id}`);
  } else if (cmd === "remove") {
    console.log(`removed ${req.id}`);
  } else if (cmd === "stop") {
    console.log("stopping the VM");
  } else if (cmd === "qmp") {
    console.log(JSON.stringify(reply.result ?? {}, null, 2));
  } else if (cmd === "status") {
    const guest = r.guest as { status?: string } | null;
    console.log(
      `${r.name}: guest ${guest?.status ?? "not started"}${
        r.migrating ? " (migrating)" : ""
      }, up ${r.elapsed} s`,
    );
    console.log(["NAME", "ROLE", "PID", "STATE", "RESTARTS"].join("\t"));
    for (const p of r.processes as Array<Record<string, unknown>>) {
      console.log([p.name, p.role, p.pid, p.state, p.restarts].join("\t"));
    }
  } else {
    console.log(
      `migrated in ${r.totalTimeMs} ms, downtime ${r.downtimeMs} ms, ` +
        `${((r.transferredBytes as number) / (1 << 20)).toFixed(1)} MiB sent`,
    );
  }
  return 0;
}

/** `events`: subscribes and prints each event line until the VM's control socket closes. */
async function followEvents(path: string, json: boolean): Promise<number> {
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (e) {
    throw new InputError(`${path}: cannot connect: ${(e as Error).message}`);
  }
  try {
    await conn.write(new TextEncoder().encode(JSON.stringify({ id: 1, cmd: "subscribe" }) + "\n"));
    let pending = "";
    const dec = new TextDecoder();
    for await (const chunk of conn.readable) {
      pending += dec.decode(chunk, { stream: true });
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const m = JSON.parse(line) as { event?: string; data?: unknown; ok?: boolean; error?: string };
        if (m.event === undefined) {
          if (m.ok === false) {
            console.error(`mpq ctl: events: ${m.error}`);
            return 1;
          }
          continue; // the subscribe reply
        }
        console.log(json ? line : `${new Date().toISOString()} ${m.event} ${JSON.stringify(m.data)}`);
      }
    }
    return 0;
  } finally {
    try {
      conn.close();
    } catch { /* closed by the server */ }
  }
}
