/**
 * Live migration of a whole VM: what QEMU 7.2 cannot migrate (checked before anything starts),
 * the `-incoming` URIs accepted, and the source side: QMP `migrate`, progress from `query-migrate`
 * until a final state.
 * @module
 */
import type { QmpClient } from "./qmp.ts";
import type { Topology } from "./topology.ts";

/** vhost-user device models QEMU 7.2 cannot migrate (their VMState is `unmigratable`). */
const UNMIGRATABLE_VHOST: ReadonlySet<string> = new Set(["vhost-user-fs-pci", "vhost-user-gpu-pci"]);

/**
 * Why QEMU 7.2 would refuse to migrate this topology, one line per device (empty: it can).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateTopology } from "./topology.ts";
 *
 * const t = validateTopology({ devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }] });
 * assert.match(migrationBlockers(t)[0], /^lsi0 \(x-pci-proxy-dev\): /);
 * ```
 */
export function migrationBlockers(t: Topology): string[] {
  const out: string[] = [];
  for (const d of t.devices) {
    switch (d.type) {
      case "remote":
        out.push(`${d.id} (x-pci-proxy-dev): QEMU 7.2 cannot migrate multi-process (x-remote) devices`);
        break;
      case "vhost-user-rng":
        out.push(`${d.id} (vhost-user-rng-pci): QEMU 7.2 marks vhost-user-rng unmigratable`);
        break;
      case "ivshmem":
        out.push(
          `${d.id} (ivshmem-doorbell): a peer device (master=off, the only mode a topology makes) blocks ` +
            `migration in QEMU`,
        );
        break;
      case "vhost-user":
        if (UNMIGRATABLE_VHOST.has(d.device)) {
          out.push(`${d.id} (${d.device}): QEMU 7.2 marks it unmigratable`);
        }
        break;
      case "vhost-user-blk":
        break;
    }
  }
  return out;
}

/**
 * `--incoming mpq-unix:PATH`: mpq, not QEMU, listens on PATH and hands QEMU the source's connection
 * (QEMU starts with `-incoming defer`).
 */
export const MPQ_UNIX_PREFIX = "mpq-unix:";

/**
 * Checks a destination URI: `tcp:HOST:PORT` or `unix:PATH` (QEMU listens), or with `mpqListens`
 * also `mpq-unix:PATH` (mpq listens); returns an error text or null.
 */
export function incomingProblem(uri: string, mpqListens = false): string | null {
  if (mpqListens && uri.startsWith(MPQ_UNIX_PREFIX)) {
    return /^\/\S+$/.test(uri.slice(MPQ_UNIX_PREFIX.length))
      ? null
      : `mpq-unix: needs an absolute path: got ${JSON.stringify(uri)}`;
  }
  const tcp = /^tcp:(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(uri);
  if (tcp) {
    const port = Number(tcp[2]);
    return port >= 1 && port <= 65535 ? null : `port ${port} is not 1..65535`;
  }
  if (/^unix:\/\S+$/.test(uri)) return null;
  return `expected tcp:HOST:PORT or unix:/ABSOLUTE/PATH${
    mpqListens ? " or mpq-unix:/ABSOLUTE/PATH" : ""
  }: got ${JSON.stringify(uri)}`;
}

/** How a finished migration went (query-migrate's figures). */
export interface MigrationResult {
  status: "completed";
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  ramTotalBytes: number;
}

/** A migration that ended in failed or cancelled: QEMU's reason. */
export class MigrationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MigrationError";
  }
}

interface QueryMigrate {
  status?: string;
  "error-desc"?: string;
  "total-time"?: number;
  "expected-downtime"?: number;
  downtime?: number;
  ram?: {
    transferred?: number;
    remaining?: number;
    total?: number;
    "dirty-pages-rate"?: number;
    "page-size"?: number;
    "mbps"?: number;
  };
}

const MIB = 1024 * 1024;

/** One progress line from a query-migrate answer. */
export function progressLine(q: QueryMigrate): string {
  const ram = q.ram ?? {};
  const total = ram.total ?? 0, remaining = ram.remaining ?? 0;
  const pct = total > 0 ? Math.floor(((total - remaining) / total) * 100) : 0;
  const dirty = ((ram["dirty-pages-rate"] ?? 0) * (ram["page-size"] ?? 4096)) / MIB;
  return `${q.status} ${pct}%, ${((ram.transferred ?? 0) / MIB).toFixed(1)} MiB sent, ` +
    `dirty ${dirty.toFixed(1)} MiB/s, expected downtime ${q["expected-downtime"] ?? 0} ms`;
}

/**
 * Runs QMP `migrate` to `uri` and follows it with query-migrate every `pollMs`, calling `progress`
 * with a line whenever it changes, until it completes (resolves with QEMU's figures) or fails or
 * is cancelled (rejects with MigrationError naming QEMU's reason). The source VM keeps running when
 * it fails.
 */
export async function migrate(
  qmp: QmpClient,
  uri: string,
  options: { progress?: (line: string) => void; pollMs?: number } = {},
): Promise<MigrationResult> {
  await qmp.execute("migrate", { uri });
  let last = "";
  while (true) {
    const q = await qmp.execute("query-migrate") as QueryMigrate;
    const line = progressLine(q);
    if (line !== last && q.status !== "completed") options.progress?.(line);
    last = line;
    if (q.status === "completed") {
      return {
        status: "completed",
        totalTimeMs: q["total-time"] ?? 0,
        downtimeMs: q.downtime ?? 0,
        transferredBytes: q.ram?.transferred ?? 0,
        ramTotalBytes: q.ram?.total ?? 0,
      };
    }
    if (q.status === "failed" || q.status === "cancelled") {
      throw new MigrationError(`migration ${q.status}${q["error-desc"] ? `: ${q["error-desc"]}` : ""}`);
    }
    await new Promise((r) => setTimeout(r, options.pollMs ?? 250));
  }
}
