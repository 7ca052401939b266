import assert from "node:assert/strict";
import { connectUnix, listenUnix, spawn } from "../../ffi/mod.ts";
import { selfCommand } from "../cli/self.ts";
import { decodeHeader, decodeU64, encodeMessage, Flags, HEADER_SIZE, Request } from "./message.ts";

async function mpq(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const [exe, ...pre] = selfCommand();
  const out = await new Deno.Command(exe, { args: [...pre, ...args], stdout: "piped", stderr: "piped" })
    .output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function waitFor(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`gave up waiting for ${what}`);
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** GET_FEATURES over a blocking connection; returns the features. */
function getFeatures(path: string): bigint {
  const s = connectUnix(path, { nonBlocking: false });
  try {
    s.sendMsg(encodeMessage(Request.GET_FEATURES, Flags.VERSION, new Uint8Array(0)));
    const buf = new Uint8Array(HEADER_SIZE + 8);
    let got = 0;
    while (got < buf.byteLength) {
      const r = s.recvMsg(buf.subarray(got));
      if (!r || r.bytes === 0) throw new Error("daemon closed the connection");
      got += r.bytes;
    }
    const h = decodeHeader(buf);
    assert.equal(h.flags, 0x5);
    return decodeU64(h.request, buf.subarray(HEADER_SIZE));
  } finally {
    s.close();
  }
}

Deno.test("vhost cli --print-capabilities prints the vhost-user.json capabilities", async () => {
  const blk = await mpq(["vhost", "blk", "--print-capabilities"]);
  assert.equal(blk.code, 0);
  assert.deepEqual(JSON.parse(blk.stdout), { type: "block", features: ["read-only", "blk-file"] });
  const rng = await mpq(["vhost", "rng", "--print-capabilities"]);
  assert.equal(rng.code, 0);
  assert.deepEqual(JSON.parse(rng.stdout), { type: "rng" });
});

Deno.test("vhost cli exits early and non-zero naming the bad argument or file", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-vhost-cli-" });
  try {
    const sock = `${dir}/s.sock`;
    const img = `${dir}/d.img`;
    Deno.writeFileSync(img, new Uint8Array(4096));
    const cases: [string[], RegExp][] = [
      [["vhost", "blk", `--socket-path=${sock}`], /--blk-file is required/],
      [["vhost", "blk", `--socket-path=${sock}`, `--blk-file=${dir}/missing.img`], /missing\.img/],
      [["vhost", "blk", `--blk-file=${img}`], /--socket-path or --fd is required/],
      [["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--fd=3"], /mutually exclusive/],
      [
        ["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--blk-size=1000"],
        /--blk-size must be 512 or 4096/,
      ],
      [
        ["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--num-queues=0"],
        /--num-queues must be/,
      ],
      [
        ["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--serial=123456789012345678901"],
        /--serial/,
      ],
      [
        ["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--io-threads=2"],
        /--io-threads must be/,
      ],
      [["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--poll-us=-1"], /--poll-us must be/],
      [["vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--bogus"], /bogus/],
      [["vhost", "rng", `--socket-path=${sock}`, "--blk-file=x"], /blk-file/],
      [["vhost", "net"], /unknown device 'net'/],
      [["vhost", "rng", "--fd=99"], /--fd 99/],
      [["vhost", "rng", "--fd=1"], /--fd 1: not a usable listening socket: .*not a socket/],
    ];
    for (const [args, re] of cases) {
      const r = await mpq(args);
      assert.equal(r.code, 1, `${args.join(" ")}: exit ${r.code}\n${r.stderr}`);
      assert.match(r.stderr, re, args.join(" "));
    }
    assert.equal(exists(sock), false, "no socket left behind");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("vhost cli serves --socket-path and exits 0 at once on SIGTERM, removing the socket", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-vhost-cli-" });
  const sock = `${dir}/rng.sock`;
  const [exe, ...pre] = selfCommand();
  const child = spawn(exe, [exe, ...pre, "vhost", "rng", `--socket-path=${sock}`], { stdio: "null" });
  try {
    await waitFor(() => exists(sock), "the socket");
    assert.ok(getFeatures(sock) & (1n << 32n), "VERSION_1 offered");
    child.kill(15);
    const st = await child.wait();
    assert.equal(st.code, 0, st.text);
    assert.equal(exists(sock), false);
  } finally {
    child.kill(9);
    await child.wait();
    child.pidfd.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("vhost cli serves the socket systemd passes (LISTEN_PID/LISTEN_FDS, fd 3)", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-vhost-cli-" });
  const sock = `${dir}/act.sock`;
  const listener = listenUnix(sock, { nonBlocking: false });
  const [exe, ...pre] = selfCommand();
  const env = { ...Deno.env.toObject(), LISTEN_FDS: "1" };
  // LISTEN_PID must be the daemon's own pid: the shell sets it to $$, then execs (same pid).
  const child = spawn("/bin/sh", ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", exe, ...pre, "vhost", "rng"], {
    env,
    fds: new Map([[3, listener.fd]]),
    stdio: "null",
  });
  try {
    assert.ok(getFeatures(sock) & (1n << 30n), "PROTOCOL_FEATURES offered");
    child.kill(15);
    const st = await child.wait();
    assert.equal(st.code, 0, st.text);
  } finally {
    child.kill(9);
    await child.wait();
    child.pidfd.close();
    listener.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("vhost cli --metrics serves Prometheus text and SIGUSR1 logs a summary line", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-vhost-cli-" });
  const sock = `${dir}/rng.sock`;
  const metrics = `${dir}/rng.metrics`;
  const [exe, ...pre] = selfCommand();
  const child = new Deno.Command(exe, {
    args: [...pre, "vhost", "rng", `--socket-path=${sock}`, `--metrics=${metrics}`],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    await waitFor(() => exists(sock) && exists(metrics), "the sockets");
    const s = connectUnix(metrics, { nonBlocking: false });
    const buf = new Uint8Array(65536);
    let text = "";
    for (;;) {
      const r = s.recvMsg(buf);
      if (!r || r.bytes === 0) break;
      text += new TextDecoder().decode(buf.subarray(0, r.bytes));
    }
    s.close();
    assert.match(text, /^mpq_vhost_requests_total\{device="rng",queue="0"\} 0$/m);
    assert.match(text, /^mpq_vhost_poll_window_seconds\{device="rng"\} 0$/m, "the adaptive window, idle");
    child.kill("SIGUSR1");
    await new Promise((r) => setTimeout(r, 300));
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0);
    assert.match(new TextDecoder().decode(out.stderr), /mpq vhost rng: 0 requests, .* 0 errors/);
    assert.equal(exists(metrics), false, "the metrics socket is removed");
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("vhost blk logs its engine choice: vmcopy on /dev/shm, io_uring or preadv elsewhere, with the reason", async () => {
  for (const where of ["/dev/shm", "."]) {
    const dir = Deno.makeTempDirSync({ dir: where, prefix: ".mpq-vhost-engine-" });
    const img = `${dir}/disk.img`;
    Deno.writeFileSync(img, new Uint8Array(1 << 20));
    const sock = `${dir}/blk.sock`;
    const [exe, ...pre] = selfCommand();
    const child = new Deno.Command(exe, {
      args: [...pre, "vhost", "blk", `--blk-file=${img}`, `--socket-path=${sock}`, "--poll-us=0"],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    try {
      await waitFor(() => exists(sock), "the socket");
      child.kill("SIGTERM");
      const err = new TextDecoder().decode((await child.output()).stderr);
      const line = err.split("\n").find((l) => l.includes(" engine ")) ?? err;
      assert.match(line, new RegExp(`^mpq vhost blk: ${img}, 1048576 bytes, writethrough, engine `));
      assert.match(line, /polling off$/);
      if (where === "/dev/shm") assert.match(line, /engine vmcopy \(tmpfs file, /);
      else assert.match(line, /engine (uring \(io_uring works|preadv \()/);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch { /* exited */ }
      Deno.removeSync(dir, { recursive: true });
    }
  }
});
