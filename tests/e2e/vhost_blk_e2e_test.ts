/**
 * End to end: a real QEMU 7.2 guest (TCG) uses `mpq vhost blk` as its vhost-user-blk disk.
 * The guest writes random data to /dev/vda and reads it back, the host file must hold the same
 * bytes, fio --verify=crc32c passes inside the guest, and a --read-only disk refuses writes.
 *
 * Large guests (issue 8): 8 GiB on pc and q35 and 64 GiB on pc, whose rings and buffers sit more
 * than 4 GiB into a guest memory region, do the same write / read-back / host check and fio verify.
 *
 * VHOST_E2E_BACKEND=qsd runs the same tests against qemu-storage-daemon (to check the tests).
 */
import assert from "node:assert/strict";
import { Reactor, Signal } from "../../ffi/mod.ts";
import { QmpClient } from "../../lib/orchestrate/qmp.ts";
import { Guest, guestAvailable } from "../helpers/guest.ts";
import {
  type Backend,
  haveTool,
  makeDiskFile,
  readFileRange,
  startMpqVhost,
  startQsd,
} from "../helpers/vhost_backends.ts";

const USE_QSD = Deno.env.get("VHOST_E2E_BACKEND") === "qsd";
const ignore = !guestAvailable() || (USE_QSD && !haveTool("qemu-storage-daemon"));
const DISK = 64 << 20;

async function startBackend(file: string, sock: string, readOnly = false, queues = 1): Promise<Backend> {
  if (USE_QSD) return await startQsd(file, sock, { writable: !readOnly, queues });
  return await startMpqVhost("blk", sock, {
    args: [`--blk-file=${file}`, `--num-queues=${queues}`, ...(readOnly ? ["--read-only"] : [])],
  });
}

function diskArgs(sock: string, chardev = "", device = ""): string[] {
  return [
    "-chardev",
    `socket,id=c0,path=${sock}${chardev}`,
    "-device",
    `vhost-user-blk-pci,chardev=c0${device}`,
  ];
}

async function sha256(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Guest script lines: 4 MiB of random data written to /dev/vda at 1 MiB (fsync), the page cache
 * dropped, read back and compared; marks `size` (sectors), `written`, `readback same` and `sha`.
 */
const WRITE_READBACK = [
  `mark size $(cat /sys/block/vda/size)`,
  `dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null`,
  `dd if=/tmp/data of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null && mark written`,
  `echo 3 > /proc/sys/vm/drop_caches`,
  `dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=64 2>/dev/null`,
  `cmp /tmp/data /tmp/back && mark readback same`,
  `mark sha $(sha256sum /tmp/data | cut -d' ' -f1)`,
];

/** Checks WRITE_READBACK's markers; returns the SHA-256 of the data, which 1..5 MiB of the file must have. */
async function checkWriteReadback(guest: Guest): Promise<string> {
  assert.equal(await guest.waitFor("size"), String(DISK / 512));
  await guest.waitFor("written");
  assert.equal(await guest.waitFor("readback"), "same", guest.tail());
  return await guest.waitFor("sha");
}

/**
 * Guest script lines: fio writes 8 MiB at 8 MiB and 8 MiB at 16 MiB of /dev/vda (two jobs, one per
 * vCPU, iodepth 16, 4k random) with crc32c verification; marks `fio` (its status) and `kib` (the
 * job count and the distinct read;write KiB per job). Needs fioFiles() in the guest.
 */
const FIO_VERIFY = [
  `chmod 755 /usr/sbin/ld-linux-x86-64.so.2 /usr/sbin/fio`,
  [
    "/usr/sbin/ld-linux-x86-64.so.2 --library-path /usr/sbin /usr/sbin/fio",
    "--name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16",
    "--rw=randwrite --bs=4k --size=8M --offset=8M --offset_increment=8M",
    "--numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split",
    "--verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse",
    "> /tmp/fio.out 2>/tmp/fio.err; rc=$?",
  ].join(" "),
  `[ $rc = 0 ] || cat /tmp/fio.out /tmp/fio.err`,
  `mark fio $rc`,
  // terse v3, one line per job: field 6 = read io KiB, field 47 = write io KiB (8 MiB each)
  `mark kib $(grep -c '^3;' /tmp/fio.out) $(grep '^3;' /tmp/fio.out | cut -d';' -f6,47 | sort -u | tr '\\n' ' ')`,
];

/** fio and every shared library it needs (ldd), flat in /usr/sbin of the guest. */
async function fioFiles(): Promise<Record<string, Uint8Array>> {
  const out = await new Deno.Command("ldd", { args: ["/usr/bin/fio"], stdout: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout);
  const files: Record<string, Uint8Array> = { "usr/sbin/fio": await Deno.readFile("/usr/bin/fio") };
  for (const line of text.split("\n")) {
    const m = /=>\s+(\/\S+)/.exec(line) ?? /^\s+(\/\S+ld-linux\S+)/.exec(line);
    if (!m) continue;
    const name = m[1].split("/").pop()!;
    files[`usr/sbin/${name}`] = await Deno.readFile(m[1]);
  }
  return files;
}

async function withDisk(
  readOnly: boolean,
  fn: (file: string, sock: string, backend: Backend) => Promise<void>,
  queues = 1,
  where?: string,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-blk-e2e-", dir: where });
  try {
    const file = `${dir}/disk.img`;
    await makeDiskFile(
      file,
      DISK,
      readOnly ? (off) => new Uint8Array(1 << 20).fill(0x5a + (off >> 20)) : undefined,
    );
    const sock = `${dir}/blk.sock`;
    const be = await startBackend(file, sock, readOnly, queues);
    try {
      await fn(file, sock, be);
      assert.equal(be.child.status, null, `${be.name} exited during the test: ${be.child.status?.text}`);
    } finally {
      await be.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "vhost blk e2e: guest writes random data to /dev/vda, reads it back, and the host file holds it",
  ignore,
  async fn() {
    await withDisk(false, async (file, sock) => {
      await using guest = await Guest.start({
        name: "vhost-blk guest",
        sharedMemory: true,
        args: diskArgs(sock),
        script: WRITE_READBACK.join("\n"),
      });
      const sha = await checkWriteReadback(guest);
      assert.equal(await guest.waitExit(), 0);
      assert.equal(
        await sha256(readFileRange(file, 1 << 20, 4 << 20)),
        sha,
        "host file matches the guest's data",
      );
    });
  },
});

for (
  const [where, what] of [
    [undefined, "a two-queue disk"],
    // The default engine there is vmcopy: batches shared with its helper thread, holes tracked.
    ["/dev/shm", "a two-queue sparse disk in /dev/shm (vmcopy engine)"],
  ] as const
) {
  Deno.test({
    name: `vhost blk e2e: fio --verify=crc32c passes in the guest on ${what}`,
    ignore: ignore || !haveTool("fio"),
    async fn() {
      await withDisk(
        false,
        async (_file, sock) => {
          await using guest = await Guest.start({
            name: "vhost-blk fio guest",
            sharedMemory: true,
            // Two vCPUs: Linux's virtio_blk uses at most one queue per CPU.
            args: ["-smp", "2", ...diskArgs(sock, "", ",num-queues=2")],
            files: await fioFiles(),
            script: [`mark queues $(ls /sys/block/vda/mq | wc -l)`, ...FIO_VERIFY].join("\n"),
          });
          assert.equal(await guest.waitFor("queues"), "2", "the guest sees two request queues");
          assert.equal(await guest.waitFor("fio", 600_000), "0", guest.tail());
          assert.equal(await guest.waitFor("kib"), "2 8192;8192", guest.tail());
          assert.equal(await guest.waitExit(), 0);
        },
        2,
        where,
      );
    },
  });
}

Deno.test({
  name: "vhost blk e2e: a --read-only disk is read-only in the guest, writes fail and the file is unchanged",
  ignore,
  async fn() {
    await withDisk(true, async (file, sock) => {
      const before = await sha256(await Deno.readFile(file));
      await using guest = await Guest.start({
        name: "vhost-blk read-only guest",
        sharedMemory: true,
        args: diskArgs(sock),
        script: [
          `mark ro $(cat /sys/block/vda/ro)`,
          `mark first $(dd if=/dev/vda bs=512 count=1 2>/dev/null | od -An -tx1 -N4 | tr -d ' ')`,
          `if dd if=/dev/zero of=/dev/vda bs=4k count=16 conv=fsync 2>/dev/null; then mark write ok; else mark write failed; fi`,
        ].join("\n"),
      });
      assert.equal(await guest.waitFor("ro"), "1");
      assert.equal(await guest.waitFor("first"), "5a5a5a5a");
      assert.equal(await guest.waitFor("write"), "failed");
      assert.equal(await guest.waitExit(), 0);
      assert.equal(await sha256(await Deno.readFile(file)), before, "the read-only file was not modified");
    });
  },
});

Deno.test({
  name:
    "vhost blk e2e: QEMU (reconnect=1) gets its disk back after kill -9 of the daemon and no write is lost",
  ignore: ignore || USE_QSD,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vhost-blk-reconnect-" });
    const file = `${dir}/disk.img`;
    await makeDiskFile(file, DISK);
    const sock = `${dir}/blk.sock`;
    const daemons: Backend[] = [];
    try {
      daemons.push(await startBackend(file, sock));
      await using guest = await Guest.start({
        name: "vhost-blk reconnect guest",
        sharedMemory: true,
        args: diskArgs(sock, ",reconnect=1"),
        script: [
          `dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null`,
          `i=0`,
          `while [ $i -lt 32 ]; do`,
          `  dd if=/tmp/data of=/dev/vda bs=256k count=1 skip=$i seek=$i conv=notrunc,fsync 2>/dev/null || mark ioerr $i`,
          `  mark chunk $i`,
          `  i=$((i+1))`,
          `done`,
          `echo 3 > /proc/sys/vm/drop_caches`,
          `dd if=/dev/vda of=/tmp/back bs=1M count=8 2>/dev/null`,
          `cmp /tmp/data /tmp/back && mark readback same`,
          `mark sha $(sha256sum /tmp/data | cut -d' ' -f1)`,
        ].join("\n"),
      });
      await guest.waitFor("chunk", 300_000);
      daemons[0].child.kill(Signal.SIGKILL);
      const doneAtKill = guest.markers().filter(([n]) => n === "chunk").length;
      assert.ok(
        doneAtKill < 32,
        `the guest was still writing when the daemon died (${doneAtKill} chunks done)`,
      );
      await daemons[0].child.wait();
      await new Promise((r) => setTimeout(r, 1500)); // QEMU sees the hang-up and keeps retrying
      daemons.push(await startBackend(file, sock));
      assert.equal(await guest.waitFor("readback", 300_000), "same", guest.tail());
      const sha = await guest.waitFor("sha");
      assert.equal(await guest.waitExit(), 0);
      assert.deepEqual(guest.markers().filter(([n]) => n === "ioerr"), [], "no write failed in the guest");
      assert.equal(await sha256(readFileRange(file, 0, 8 << 20)), sha, "host file holds every chunk");
    } finally {
      for (const d of daemons) await d.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---------------------------------------------------------------------------------------------
// Large guests (issue 8)
//
// pc and q35 put the RAM that does not fit below their PCI hole at guest-physical 4 GiB, and QEMU
// hands it to the back-end as one memory region of `high` bytes (memfd offset: the RAM below 4 GiB;
// the daemon's /proc/PID/maps shows e.g. 5 GiB at offset 3 GiB for 8 GiB on pc), so a ring or buffer
// at guest-physical 4 GiB + X sits X bytes into the daemon's mapping of that region. Before 436c378
// the daemon sized its u16/u32 views of a region with `>>>` (a 5 GiB region got a 1 GiB view: an
// 8 GiB pc guest hung at boot, "SET_VRING_KICK: Invalid atomic access index") and turned ring
// offsets into indexes with `>>>` (a ring 4.5 GiB in was read 4 GiB lower).
//
// Where Linux puts its rings changes from boot to boot (8 GiB pc guests had them at 4.03 or 6.9 GiB,
// q35 at 4.5 to 8.2 GiB: often too low for either fault), so each guest is told (memmap=<n>G$4G)
// that all of its high RAM but the last GiB is reserved. The memory table still holds the whole
// region, but the kernel takes its rings, request headers and page cache from that last GiB, which
// starts 4 GiB or more into the region: past the 32-bit wrap of both old faults.
//
// What the tests prove: QEMU (QMP x-query-virtio-vhost-queue-status, HMP xp of the descriptor
// tables) shows every ring of both queues and the data buffers of recent requests in that last
// GiB, and with them there the daemon reads avail entries and descriptors and writes used entries and data
// at the right bytes: 4 MiB written and read back (page cache dropped) match, the host file holds
// them, and fio's crc32c verify of 2 x 8 MiB of 4k random writes at iodepth 16 passes. A wrong byte
// anywhere hangs the guest or corrupts the data; before 436c378 each guest hangs in its first
// partition scan (no `MPQ:size` marker). QEMU's RSS is checked to stay small: memfd RAM is sparse.

const GiB = 2 ** 30;
/** Guest-physical start of the RAM above the PCI hole on pc and q35. */
const HIGH_RAM = 4 * GiB;
/** RAM below 4 GiB in QEMU 7.2 for large guests: pc (3.5 GiB or more) keeps 3 GiB, q35 (2.75+) 2 GiB. */
const LOW_RAM = { pc: 3 * GiB, q35: 2 * GiB } as const;
/** The disk's last sector: the host writes "go" there when it has looked at the rings. */
const RELEASE_SECTOR = DISK / 512 - 1;

/** Guest-physical addresses in use by the vhost-user-blk device with id `vblk0`. */
interface Placement {
  /** desc, avail and used ring of each queue. */
  rings: number[];
  /**
   * Data buffers (512 bytes or more) that the descriptor tables (and the indirect tables they
   * point to) hold now: those of the latest requests. Read with HMP `xp`, which only reads: QMP's
   * x-query-virtio-queue-element calls virtio_error() on a stale chain and breaks the device.
   */
  buffers: number[];
}

const VIRTQ_DESC_F_INDIRECT = 4;
const hex = (a: number) => `0x${a.toString(16)}`;

/** `count` split-ring descriptors at guest-physical `addr`, read through HMP `xp`. */
async function readDescriptors(
  qmp: QmpClient,
  addr: number,
  count: number,
): Promise<Array<{ addr: number; len: number; flags: number }>> {
  const text = await qmp.execute("human-monitor-command", {
    "command-line": `xp /${2 * count}gx ${hex(addr)}`,
  }) as string;
  // "0000000207093000: 0x0000000201a01000 0x0000000000011000"
  const words = text.split("\n").flatMap((l) => l.split(": ")[1]?.trim().split(/\s+/) ?? []).map(BigInt);
  const out = [];
  for (let i = 0; i + 1 < words.length; i += 2) {
    out.push({
      addr: Number(words[i]),
      len: Number(words[i + 1] & 0xffffffffn),
      flags: Number((words[i + 1] >> 32n) & 0xffffn),
    });
  }
  return out;
}

async function placement(qmpPath: string, queues: number, ramEnd: number): Promise<Placement> {
  const reactor = new Reactor();
  const running = reactor.run();
  const qmp = QmpClient.connect(qmpPath, reactor);
  try {
    await qmp.greeting;
    await qmp.execute("qmp_capabilities");
    const path = "/machine/peripheral/vblk0/virtio-backend";
    const out: Placement = { rings: [], buffers: [] };
    const plausible = (d: { addr: number; len: number }) =>
      d.len >= 512 && d.len <= 1 << 20 && d.addr + d.len <= ramEnd;
    for (let queue = 0; queue < queues; queue++) {
      const st = await qmp.execute("x-query-virtio-vhost-queue-status", { path, queue }) as Record<
        string,
        number
      >;
      out.rings.push(st["desc-phys"], st["avail-phys"], st["used-phys"]);
      for (const d of await readDescriptors(qmp, st["desc-phys"], st.num)) {
        if (
          d.flags & VIRTQ_DESC_F_INDIRECT && d.len % 16 === 0 && d.len <= 4096 && d.addr + d.len <= ramEnd
        ) {
          // The table of a finished request may have been freed and reused: keep plausible entries.
          for (const e of await readDescriptors(qmp, d.addr, d.len / 16)) {
            if (plausible(e)) out.buffers.push(e.addr);
          }
        } else if (plausible(d)) {
          out.buffers.push(d.addr);
        }
      }
    }
    return out;
  } finally {
    qmp.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}

/** Resident set size of a process in MiB (/proc/PID/status VmRSS). */
function rssMiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Math.round(Number(m[1]) / 1024);
}

for (const [machine, memoryGiB] of [["pc", 8], ["q35", 8], ["pc", 64]] as const) {
  const high = memoryGiB * GiB - LOW_RAM[machine];
  /** The only guest RAM above 4 GiB the kernel may use: [usable, HIGH_RAM + high). */
  const usable = HIGH_RAM + high - GiB;
  Deno.test({
    name: `vhost blk e2e: a ${machine} guest with ${memoryGiB} GiB of memfd RAM (rings and buffers ${
      (usable - HIGH_RAM) / GiB
    } GiB into a region) writes, reads back and passes fio --verify=crc32c`,
    ignore: ignore || !haveTool("fio"),
    async fn() {
      assert.ok(usable - HIGH_RAM >= 4 * GiB, "the usable RAM lies 4 GiB or more into the high region");
      await withDisk(
        false,
        async (file, sock, backend) => {
          const qmpPath = sock.replace(/blk\.sock$/, "qmp.sock");
          await using guest = await Guest.start({
            name: `vhost-blk ${memoryGiB} GiB ${machine} guest`,
            machine,
            memoryMiB: memoryGiB * 1024,
            sharedMemory: true,
            append: `memmap=${high / GiB - 1}G$${hex(HIGH_RAM)}`,
            args: [
              "-smp",
              "2",
              "-qmp",
              `unix:${qmpPath},server=on,wait=off`,
              ...diskArgs(sock, "", ",id=vblk0,num-queues=2"),
            ],
            files: await fioFiles(),
            script: [
              ...WRITE_READBACK,
              ...FIO_VERIFY,
              `mark ready`,
              `until [ "$(dd if=/dev/vda bs=512 skip=${RELEASE_SECTOR} count=1 iflag=direct 2>/dev/null | tr -dc a-z)" = go ]; do usleep 100000; done`,
            ].join("\n"),
          });
          const sha = await checkWriteReadback(guest);
          assert.equal(await guest.waitFor("fio", 600_000), "0", guest.tail());
          assert.equal(await guest.waitFor("kib"), "2 8192;8192", guest.tail());
          await guest.waitFor("ready");
          const qemuRss = rssMiB(guest.pid);
          const daemonRss = rssMiB(backend.child.pid);
          const p = await placement(qmpPath, 2, HIGH_RAM + high);
          using f = await Deno.open(file, { write: true });
          await f.seek(RELEASE_SECTOR * 512, Deno.SeekMode.Start);
          await f.write(new TextEncoder().encode("go"));
          assert.equal(await guest.waitExit(), 0);
          assert.equal(
            await sha256(readFileRange(file, 1 << 20, 4 << 20)),
            sha,
            "host file matches the guest's data",
          );

          const high4 = p.buffers.filter((a) => a >= usable);
          const span = high4.length ? `${hex(Math.min(...high4))}..${hex(Math.max(...high4))}` : "-";
          console.error(`  ${memoryGiB} GiB ${machine}: ${
            [
              `high RAM ${hex(HIGH_RAM)}+${high / GiB} GiB`,
              `rings ${p.rings.map(hex).join(" ")}`,
              `${high4.length}/${p.buffers.length} data buffers in the last GiB (${span})`,
              `RSS QEMU ${qemuRss} MiB, ${backend.name} ${daemonRss} MiB`,
            ].join("; ")
          }`);
          assert.ok(
            p.rings.every((a) => a >= usable && a < HIGH_RAM + high),
            `every ring in the region's last GiB [${hex(usable)}, ${hex(HIGH_RAM + high)}): ${
              p.rings.map(hex).join(" ")
            }`,
          );
          assert.ok(high4.length > 0, `data buffers in the last GiB too: ${p.buffers.map(hex).join(" ")}`);
          assert.ok(qemuRss < 2048, `QEMU's RSS stays small (memfd guest RAM is sparse): ${qemuRss} MiB`);
        },
        2,
      );
    },
  });
}
