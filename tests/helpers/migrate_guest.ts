/**
 * The guest of the live-migration tests (tests/e2e/vhost_migrate_e2e_test.ts and
 * orchestrate_migrate_e2e_test.ts): a script that writes, reads back and verifies its disk in
 * rounds through the switch, the disk it needs, and how the host tells it to finish.
 * @module
 */
import { Reactor } from "../../ffi/mod.ts";
import { QmpClient } from "../../lib/orchestrate/qmp.ts";
import { type Backend, makeDiskFile, patternBytes, startMpqVhost, startQsd } from "./vhost_backends.ts";

/** The disk the guest uses. */
export const DISK = 64 << 20;
/** The host-filled region the guest hashes: 16..24 MiB. */
export const FILLED = { at: 16 << 20, len: 8 << 20 };
/** The sector the host writes STOP to when the guest should finish (60 MiB). */
export const STOP_SECTOR = (60 << 20) / 512;
/** Guest RAM. */
export const MEMORY_MIB = 256;
/**
 * Debian's kernel zeroes every page it allocates (init_on_alloc): that CPU write marks a fresh
 * page-cache page dirty in QEMU's own bitmap just before the device fills it, which would hide a
 * device write missing from the dirty log. Off, only the dirty log can make QEMU resend it.
 */
export const GUEST_APPEND = "init_on_alloc=0";

/**
 * The guest, in rounds: compare the 32 blocks of 64 KiB at 8 MiB, as the page cache still holds them
 * from the end of the last round, with that round's contents (each block names its round); stop if
 * sector STOP_SECTOR holds STOP; hash the host-filled region `reads` times, the page cache dropped
 * before each; (`hwrng`) read 64 bytes of /dev/hwrng; write the blocks with this round's contents,
 * drop the page cache, read them back (the device writing into guest RAM) and compare; `mark round
 * R`. At the end it marks `result MISMATCHES ROUNDS`.
 */
export function guestScript(filledSha: string, reads: number, hwrng: boolean): string {
  return [
    `B=32; base=128; r=0; bad=0`,
    // Hashes the filled region (read by the device into the page cache, just dropped).
    `check() {`,
    `  echo 3 > /proc/sys/vm/drop_caches`,
    `  h=$(dd if=/dev/vda bs=1M skip=${FILLED.at >> 20} count=${
      FILLED.len >> 20
    } 2>/dev/null | sha256sum | cut -d' ' -f1)`,
    `  [ "$h" = ${filledSha} ] || { bad=$((bad+1)); echo "MISMATCH round $r $1"; }`,
    `}`,
    // Compares the blocks with round $1's contents, read through the page cache.
    `blocks() {`,
    `  b=0`,
    `  while [ $b -lt $B ]; do`,
    `    yes "round $1 block $b " | head -c 65536 > /tmp/w`,
    `    dd if=/dev/vda of=/tmp/r bs=65536 skip=$((base+b)) count=1 2>/dev/null`,
    `    cmp -s /tmp/w /tmp/r || { bad=$((bad+1)); echo "MISMATCH round $r $2 block $b"; }`,
    `    b=$((b+1))`,
    `  done`,
    `}`,
    `mark started`,
    `while :; do`,
    `  r=$((r+1))`,
    // The blocks the device read into the page cache at the end of the last round — perhaps on the
    // other host — must hold that round's data: a page the device wrote but did not log would not.
    `  [ $r -gt 1 ] && blocks $((r-1)) cached`,
    `  echo 3 > /proc/sys/vm/drop_caches`,
    `  [ "$(dd if=/dev/vda bs=512 skip=${STOP_SECTOR} count=1 2>/dev/null | head -c 4)" = STOP ] && break`,
    `  k=0`,
    `  while [ $k -lt ${reads} ]; do check "filled region read $k"; k=$((k+1)); done`,
    ...(hwrng
      ? [
        `  n=$(head -c 64 /dev/hwrng | wc -c)`,
        `  [ "$n" = 64 ] || { bad=$((bad+1)); echo "MISMATCH round $r hwrng $n"; }`,
      ]
      : []),
    `  b=0`,
    `  while [ $b -lt $B ]; do`,
    `    yes "round $r block $b " | head -c 65536 > /tmp/w`,
    `    dd if=/tmp/w of=/dev/vda bs=65536 seek=$((base+b)) conv=fsync 2>/dev/null || bad=$((bad+1))`,
    `    b=$((b+1))`,
    `  done`,
    `  echo 3 > /proc/sys/vm/drop_caches`,
    `  blocks $r "read back"`,
    `  mark round $r`,
    `done`,
    `mark result $bad $((r-1))`,
  ].join("\n");
}

async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Makes the guest's disk (1 MiB pattern blocks); returns the SHA-256 of its filled region. */
export async function makeMigrationDisk(file: string): Promise<string> {
  await makeDiskFile(file, DISK, (off) => patternBytes(1 << 20, 31 + (off >> 20)));
  return await sha256Hex(Deno.readFileSync(file).slice(FILLED.at, FILLED.at + FILLED.len));
}

/** Tells the guest to finish: STOP at sector STOP_SECTOR of its disk. */
export function writeStop(file: string): void {
  const f = Deno.openSync(file, { write: true });
  try {
    f.seekSync(STOP_SECTOR * 512, Deno.SeekMode.Start);
    f.writeSync(new TextEncoder().encode("STOP"));
    f.syncSync();
  } finally {
    f.close();
  }
}

/** One side of the migration: its back-ends and its QEMU's arguments. */
export interface Side {
  backends: Backend[];
  qmp: string;
  args: string[];
}

/** A disk back-end (mpq, or qsd with `qsd`) and, with `rng`, an mpq rng; QMP at `qmp`. */
export async function startSide(
  dir: string,
  name: string,
  file: string,
  options: { qsd?: boolean; rng?: boolean; args?: string[] } = {},
): Promise<Side> {
  const blkSock = `${dir}/${name}-blk.sock`, rngSock = `${dir}/${name}-rng.sock`;
  const qmp = `${dir}/${name}-qmp.sock`;
  const side: Side = {
    backends: [],
    qmp,
    args: [
      "-chardev",
      `socket,id=c0,path=${blkSock}`,
      "-device",
      "vhost-user-blk-pci,chardev=c0,id=vblk0",
      "-qmp",
      `unix:${qmp},server=on,wait=off`,
    ],
  };
  side.backends.push(
    options.qsd
      ? await startQsd(file, blkSock, { writable: true, queues: 1 })
      : await startMpqVhost("blk", blkSock, {
        args: [`--blk-file=${file}`, "--num-queues=1", ...(options.args ?? [])],
      }),
  );
  if (options.rng) {
    try {
      side.backends.push(await startMpqVhost("rng", rngSock));
    } catch (e) {
      await stopSide(side);
      throw e;
    }
    side.args.push(
      "-chardev",
      `socket,id=c1,path=${rngSock}`,
      "-device",
      "vhost-user-rng-pci,chardev=c1,id=vrng0",
    );
  }
  return side;
}

export async function stopSide(s: Side): Promise<void> {
  await Promise.all(s.backends.map((b) => b.stop()));
}

/** Runs `fn` with a QMP client on `path`. */
export async function withQmp<T>(path: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
  const reactor = new Reactor();
  const running = reactor.run();
  const qmp = QmpClient.connect(path, reactor);
  try {
    await qmp.greeting;
    await qmp.execute("qmp_capabilities");
    return await fn(qmp);
  } finally {
    qmp.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}

/** query-migrate until a final state; returns the last answer. */
export async function migrationOutcome(
  qmp: QmpClient,
  timeoutMs = 120_000,
): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const st = await qmp.execute("query-migrate") as Record<string, unknown>;
    if (["completed", "failed", "cancelled"].includes(st.status as string)) return st;
    if (Date.now() > deadline) throw new Error(`migration still ${st.status} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function runStatus(qmpPath: string): Promise<string> {
  return await withQmp(
    qmpPath,
    async (q) => ((await q.execute("query-status")) as { status: string }).status,
  );
}
