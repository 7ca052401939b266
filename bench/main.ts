/**
 * `deno task bench`: runs every benchmark module, one after another, each printing its own table.
 * `deno task bench NAME...` runs only the named ones; `--list` prints the names.
 * A benchmark that fails is reported and the others still run; the exit code is then 1.
 * @module
 */
import { parseArgs } from "node:util";

/** One benchmark: loaded only when it runs. Adding a benchmark module is one line here. */
export const BENCHES: ReadonlyArray<{ name: string; summary: string; run: () => Promise<void> }> = [
  {
    name: "ivshmem",
    summary: "ivshmem join storm of 1000 and 4000 peers x 4 vectors: mpq vs contrib ivshmem-server",
    run: () => import("./ivshmem.ts").then((m) => m.benchIvshmem()),
  },
  {
    name: "vhost",
    summary:
      "vhost-user-blk 4K random I/O: mpq vs libvhost-user (contrib vhost-user-blk) and qemu-storage-daemon",
    run: () => import("./vhost.ts").then((m) => m.benchVhost()),
  },
  {
    name: "vhost_memory",
    summary: "RSS of one process serving 1, 10, 50 vhost-user-blk devices, idle and loaded: mpq vs qsd",
    run: () => import("./vhost_memory.ts").then((m) => m.benchVhostMemory()),
  },
  {
    name: "startup",
    summary: "mpq --version against a bare deno run of a one-line script",
    run: () => import("./startup.ts").then((m) => m.benchStartup()),
  },
  {
    name: "migrate",
    summary: "live migration of a 1 GiB guest writing its disk: mpq vs qemu-storage-daemon back-ends",
    run: () => import("./migrate.ts").then((m) => m.benchMigrate()),
  },
  {
    name: "orchestrate",
    summary: "multi-process QEMU start-up: mpq orchestrate vs a shell script",
    run: () => import("./orchestrate.ts").then((m) => m.benchOrchestrate()),
  },
];

const USAGE = `Usage: deno task bench [--list] [NAME...]
Benchmarks: ${BENCHES.map((b) => b.name).join(", ")}`;

async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: { list: { type: "boolean" }, help: { type: "boolean", short: "h" } },
    });
  } catch (e) {
    console.error(`bench: ${(e as Error).message}\n${USAGE}`);
    return 1;
  }
  if (parsed.values.help) {
    console.log(USAGE);
    return 0;
  }
  if (parsed.values.list) {
    for (const b of BENCHES) console.log(`${b.name.padEnd(12)} ${b.summary}`);
    return 0;
  }
  const unknown = parsed.positionals.filter((n) => !BENCHES.some((b) => b.name === n));
  if (unknown.length > 0) {
    console.error(
      `bench: unknown benchmark ${unknown.join(", ")}: expected one of ${
        BENCHES.map((b) => b.name).join(", ")
      }`,
    );
    return 1;
  }
  const selected = parsed.positionals.length > 0
    ? BENCHES.filter((b) => parsed.positionals.includes(b.name))
    : BENCHES;
  const failed: string[] = [];
  for (const b of selected) {
    console.log(`\n## ${b.name}: ${b.summary}\n`);
    const start = performance.now();
    try {
      await b.run();
    } catch (e) {
      failed.push(b.name);
      console.error(`bench ${b.name} failed: ${e instanceof Error ? e.stack ?? e.message : e}`);
    }
    console.log(`(${b.name}: ${((performance.now() - start) / 1000).toFixed(1)} s)`);
  }
  if (failed.length > 0) console.error(`\nfailed: ${failed.join(", ")}`);
  return failed.length > 0 ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
