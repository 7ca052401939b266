/**
 * End to end: a real QEMU 7.2 guest (TCG) uses `mpq vhost blk` as its vhost-user-blk disk.
 * The guest writes random data to /dev/vda and reads it back, the host file must hold the same
 * bytes, fio --verify=crc32c passes inside the guest, and a --read-only disk refuses writes.
 *
 * VHOST_E2E_BACKEND=qsd runs the same tests against qemu-storage-daemon (to check the tests).
 */
import assert from "node:assert/strict";
import { Signal } from "../../ffi/mod.ts";
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
  fn: (file: string, sock: string) => Promise<void>,
  queues = 1,
  where?: string,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-blk-e2e-", dir: where });
  const file = `${dir}/disk.img`;
  await makeDiskFile(
    file,
    DISK,
    readOnly ? (off) => new Uint8Array(1 << 20).fill(0x5a + (off >> 20)) : undefined,
  );
  const sock = `${dir}/blk.sock`;
  const be = await startBackend(file, sock, readOnly, queues);
  try {
    await fn(file, sock);
    assert.equal(be.child.status, null, `${be.name} exited during the test: ${be.child.status?.text}`);
  } finally {
    await be.stop();
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
        script: [
          `mark size $(cat /sys/block/vda/size)`,
          `dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null`,
          `dd if=/tmp/data of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null && mark written`,
          `echo 3 > /proc/sys/vm/drop_caches`,
          `dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=64 2>/dev/null`,
          `cmp /tmp/data /tmp/back && mark readback same`,
          `mark sha $(sha256sum /tmp/data | cut -d' ' -f1)`,
        ].join("\n"),
      });
      assert.equal(await guest.waitFor("size"), String(DISK / 512));
      await guest.waitFor("written");
      assert.equal(await guest.waitFor("readback"), "same");
      const sha = await guest.waitFor("sha");
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
          const fio = [
            "/usr/sbin/ld-linux-x86-64.so.2 --library-path /usr/sbin /usr/sbin/fio",
            "--name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16",
            "--rw=randwrite --bs=4k --size=8M --offset=8M --offset_increment=8M",
            "--numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split",
            "--verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse",
          ].join(" ");
          await using guest = await Guest.start({
            name: "vhost-blk fio guest",
            sharedMemory: true,
            // Two vCPUs: Linux's virtio_blk uses at most one queue per CPU.
            args: ["-smp", "2", ...diskArgs(sock, "", ",num-queues=2")],
            files: await fioFiles(),
            script: [
              `chmod 755 /usr/sbin/ld-linux-x86-64.so.2 /usr/sbin/fio`,
              `mark queues $(ls /sys/block/vda/mq | wc -l)`,
              `${fio} > /tmp/fio.out 2>/tmp/fio.err; rc=$?`,
              `[ $rc = 0 ] || cat /tmp/fio.out /tmp/fio.err`,
              `mark fio $rc`,
              // terse v3, one line per job: field 6 = read io KiB, field 47 = write io KiB (8 MiB each)
              `mark kib $(grep -c '^3;' /tmp/fio.out) $(grep '^3;' /tmp/fio.out | cut -d';' -f6,47 | sort -u | tr '\\n' ' ')`,
            ].join("\n"),
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
    const daemons: Backend[] = [await startBackend(file, sock)];
    try {
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
