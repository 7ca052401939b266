import assert from "node:assert/strict";
import {
  descriptorDirs,
  type DescriptorFile,
  pickDescriptor,
  readDescriptorFiles,
} from "./vhost_user_descriptors.ts";

const d = (dir: string, name: string, type: string, binary: string): DescriptorFile => ({
  name,
  path: `${dir}/${name}`,
  text: JSON.stringify({ description: name, type, binary }),
});

Deno.test("vhost-user descriptors: later directories replace a file of the same name; priority is name order", () => {
  const files = [
    d("/usr/share/qemu/vhost-user", "50-qemu-virtiofsd.json", "fs", "/usr/lib/qemu/virtiofsd"),
    d("/usr/share/qemu/vhost-user", "60-other-fs.json", "fs", "/opt/fs"),
    d("/usr/share/qemu/vhost-user", "50-qemu-gpu.json", "gpu", "/usr/lib/qemu/vhost-user-gpu"),
    d("/etc/qemu/vhost-user", "50-qemu-virtiofsd.json", "fs", "/usr/local/bin/virtiofsd"),
  ];
  assert.equal(
    pickDescriptor("qemu-virtiofsd", files).binary,
    "/usr/local/bin/virtiofsd",
    "/etc replaces /usr/share",
  );
  assert.equal(pickDescriptor("other-fs", files).binary, "/opt/fs");
  assert.equal(
    pickDescriptor("fs", files).name,
    "qemu-virtiofsd",
    "by type: the 50- file before the 60- one",
  );
  assert.equal(pickDescriptor("gpu", files).binary, "/usr/lib/qemu/vhost-user-gpu");
});

Deno.test("vhost-user descriptors: nothing matching, or broken files, are named in the error", () => {
  const files = [
    d("/usr/share/qemu/vhost-user", "50-qemu-virtiofsd.json", "fs", "/usr/lib/qemu/virtiofsd"),
    { name: "70-broken.json", path: "/etc/qemu/vhost-user/70-broken.json", text: "{" },
    { name: "80-nobinary.json", path: "/etc/qemu/vhost-user/80-nobinary.json", text: '{"type": "net"}' },
  ];
  assert.throws(
    () => pickDescriptor("net", files),
    /no vhost-user descriptor named or of type "net" \(found: qemu-virtiofsd \(type fs\)\); skipped: \/etc\/qemu\/vhost-user\/70-broken\.json: not JSON .*; \/etc\/qemu\/vhost-user\/80-nobinary\.json: needs "type" and "binary" strings/,
  );
});

Deno.test("vhost-user descriptors: search directories and reading them (missing ones skipped)", () => {
  assert.deepEqual(descriptorDirs({ HOME: "/home/u" }), [
    "/usr/share/qemu/vhost-user",
    "/etc/qemu/vhost-user",
    "/home/u/.config/qemu/vhost-user",
  ]);
  assert.equal(descriptorDirs({ XDG_CONFIG_HOME: "/x", HOME: "/home/u" })[2], "/x/qemu/vhost-user");
  const dir = Deno.makeTempDirSync();
  try {
    Deno.writeTextFileSync(`${dir}/10-a.json`, '{"type": "fs", "binary": "/a"}');
    Deno.writeTextFileSync(`${dir}/README`, "not a descriptor");
    const files = readDescriptorFiles([`${dir}/missing`, dir]);
    assert.deepEqual(files.map((f) => f.name), ["10-a.json"]);
    assert.equal(pickDescriptor("a", files).binary, "/a");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
