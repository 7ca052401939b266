import assert from "node:assert/strict";
import { cpioNewc, gzip, scriptArchive } from "./guest.ts";

async function cpioList(archive: Uint8Array<ArrayBuffer>, gzipped: boolean): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "mpq-cpio-" });
  try {
    const file = `${dir}/a.cpio${gzipped ? ".gz" : ""}`;
    await Deno.writeFile(file, archive);
    const cmd = gzipped ? `gzip -dc ${file} | cpio -itv --quiet` : `cpio -itv --quiet < ${file}`;
    const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" })
      .output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    return new TextDecoder().decode(out.stdout);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("cpioNewc writes an archive GNU cpio lists with names, modes, sizes and device nodes", async () => {
  const enc = new TextEncoder();
  const archive = cpioNewc([
    { name: "bin", mode: 0o40755 },
    { name: "bin/x", mode: 0o100755, data: enc.encode("abc") },
    { name: "/odd-name-len", mode: 0o100644, data: enc.encode("12345") },
    { name: "dev/console", mode: 0o20600, rdev: [5, 1] },
  ]);
  assert.equal(archive.byteLength % 4, 0);
  const listing = (await cpioList(archive, false)).trim().split("\n");
  assert.equal(listing.length, 4);
  assert.match(listing[0], /^drwxr-xr-x .* bin$/);
  assert.match(listing[1], /^-rwxr-xr-x .* 3 .* bin\/x$/);
  assert.match(listing[2], /^-rw-r--r-- .* 5 .* odd-name-len$/);
  assert.match(listing[3], /^crw------- .* 5,\s+1 .* dev\/console$/);
});

Deno.test("cpioNewc file contents come back byte for byte through cpio -i", async () => {
  const data = new Uint8Array(1001).map((_, i) => (i * 7) & 0xff);
  const dir = await Deno.makeTempDir({ prefix: "mpq-cpio-" });
  try {
    await Deno.writeFile(`${dir}/a.cpio.gz`, await gzip(cpioNewc([{ name: "f", mode: 0o100600, data }])));
    const out = await new Deno.Command("sh", {
      args: ["-c", "gzip -dc a.cpio.gz | cpio -id --quiet"],
      cwd: dir,
      stderr: "piped",
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.deepEqual(await Deno.readFile(`${dir}/f`), data);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("scriptArchive holds an executable /test.sh and the extra files", async () => {
  const listing = await cpioList(
    await scriptArchive("echo hi", { "etc/a.conf": "x=1", "bin/t.sh": "true" }),
    true,
  );
  assert.match(listing, /-rwxr-xr-x .* test\.sh/);
  assert.match(listing, /-rw-r--r-- .* etc\/a\.conf/);
  assert.match(listing, /-rwxr-xr-x .* bin\/t\.sh/);
});

Deno.test("cpioNewc rejects a field that does not fit in 32 bits", () => {
  assert.throws(() => cpioNewc([{ name: "x", mode: 0x1_0000_0000 }]), /cpio field out of range: 4294967296/);
});
