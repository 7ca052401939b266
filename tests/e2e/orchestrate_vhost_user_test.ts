/**
 * Any vhost-user back-end, not just mpq's (issue 11 §3), launched and supervised by
 * `mpq orchestrate`: the virtiofsd Debian ships, found through its QEMU vhost-user descriptor by
 * type ("fs"), serves a directory the guest mounts with virtiofs and reads a file from; and
 * qemu-storage-daemon, started by mpq with an fd export on a pre-opened socket, serves a qcow2
 * image the guest reads.
 */
import assert from "node:assert/strict";
import { guestAvailable, kernelPath, writeInitrd } from "../helpers/guest.ts";
import { patternBytes } from "../helpers/vhost_backends.ts";
import { consoleMarker, MpqRun, sha256Hex, tempDir, writeTopology } from "./orchestrate_harness.ts";

const VIRTIOFSD = "/usr/lib/qemu/virtiofsd";

function have(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

Deno.test({
  name:
    "orchestrate any vhost-user back-end e2e: Debian's virtiofsd by descriptor (the guest mounts and reads a file) and qemu-storage-daemon serving a qcow2 image (the guest reads it)",
  ignore: !guestAvailable() || !have(VIRTIOFSD),
  async fn() {
    using dir = tempDir("mpq-vhost-user-");
    const share = `${dir.path}/share`;
    Deno.mkdirSync(share);
    const secret = `written by the host ${crypto.randomUUID()}`;
    Deno.writeTextFileSync(`${share}/hello.txt`, secret);
    const raw = `${dir.path}/raw.img`;
    const data = patternBytes(1 << 20, 9);
    Deno.writeFileSync(raw, data);
    const qcow2 = `${dir.path}/disk.qcow2`;
    const conv = await new Deno.Command("qemu-img", {
      args: ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2],
    })
      .output();
    assert.equal(conv.code, 0, new TextDecoder().decode(conv.stderr));
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(
      initrd,
      [
        `mkdir -p /mnt && mount -t virtiofs share /mnt && mark mounted yes || mark mounted no`,
        `mark file $(cat /mnt/hello.txt)`,
        `mark qcow2 $(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)`,
        `sleep 120`,
      ].join("\n"),
    );
    const consoleFile = `${dir.path}/console.log`;
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "vhost-user",
        memory: "256M",
        kernel: kernelPath(),
        initrd,
        append: "console=ttyS0 panic=-1 quiet loglevel=3",
        console: { file: consoleFile },
        devices: [
          {
            type: "vhost-user",
            id: "fs0",
            device: "vhost-user-fs-pci",
            backend: { descriptor: "fs", args: ["-o", `source=${share}`, "-o", "sandbox=chroot"] },
            properties: { tag: "share" },
          },
          {
            type: "vhost-user-blk",
            id: "q0",
            backend: { qsd: { file: qcow2, format: "qcow2", readOnly: true } },
          },
        ],
      }),
    ]);
    await run.waitFor(/\] running +3 processes/);
    assert.match(run.stdout, /vhost-user fs0 +pid \d+ started/);
    assert.match(run.stdout, /qsd q0 +pid \d+ started/);
    assert.equal(await consoleMarker(consoleFile, "mounted", run), "yes");
    assert.equal(await consoleMarker(consoleFile, "file", run), secret);
    assert.equal(await consoleMarker(consoleFile, "qcow2", run), await sha256Hex(data));
  },
});
