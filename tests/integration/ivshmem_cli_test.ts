/**
 * `mpq ivshmem` and `mpq ivshmem client` as processes: signals, daemon mode, flag errors, the
 * scriptable client, and a server that runs out of fds.
 */
import assert from "node:assert/strict";
import { kill, listOpenFds, Signal } from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { closeAll, GUARD_MS, mpq, RawPeer, scratch, ServerProcess } from "./ivshmem_helpers.ts";

const delay = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function eventually(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + GUARD_MS;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`gave up waiting for ${what}`);
    await delay(10);
  }
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(`mpq ivshmem -F on ${signal}: closes peers, removes socket and shm object, exits 0`, async () => {
    const fdsBefore = listOpenFds();
    const s = scratch();
    try {
      const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName, "-n", "2", "-l", "1M"]);
      assert.ok(exists(`/dev/shm/${s.shmName}`));
      assert.equal(Deno.lstatSync(s.socketPath).mode! & 0o777, 0o600);
      const a = new RawPeer(s.socketPath);
      const b = new RawPeer(s.socketPath);
      closeAll(await a.recvJoin(2));
      closeAll(await b.recvJoin(2));
      const { code, stdout } = await server.stop(signal);
      assert.equal(code, 0, stdout);
      await a.closedByServer();
      await b.closedByServer();
      a.close();
      b.close();
      assert.ok(!exists(s.socketPath), "socket removed");
      assert.ok(!exists(`/dev/shm/${s.shmName}`), "shm object removed");
    } finally {
      s.remove();
    }
    assert.deepEqual(listOpenFds(), fdsBefore, "no fd left in this process");
  });
}

Deno.test("mpq ivshmem -M uses an existing object of the requested size and leaves it, contents intact, on SIGTERM", async () => {
  const s = scratch();
  const path = `/dev/shm/${s.shmName}`;
  const contents = crypto.getRandomValues(new Uint8Array(64 << 10));
  try {
    Deno.writeFileSync(path, contents, { createNew: true, mode: 0o600 });
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName, "-l", "64K"]);
    const p = new RawPeer(s.socketPath);
    closeAll(await p.recvJoin(1));
    const { code, stdout } = await server.stop("SIGTERM");
    assert.equal(code, 0, stdout);
    await p.closedByServer();
    p.close();
    assert.ok(!exists(s.socketPath), "socket removed");
    assert.equal(Deno.statSync(path).size, 64 << 10, "the object is still there, same size");
    assert.deepEqual(Deno.readFileSync(path), contents, "with its contents");
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem -M refuses an existing object of another size: exit 1 naming it and both sizes, object unchanged", async () => {
  const s = scratch();
  const path = `/dev/shm/${s.shmName}`;
  const contents = crypto.getRandomValues(new Uint8Array(64 << 10));
  try {
    Deno.writeFileSync(path, contents, { createNew: true, mode: 0o600 });
    const want = `mpq ivshmem: cannot start on ${s.socketPath} (shm ${s.shmName}): shm object ${s.shmName} ` +
      `(${path}) already exists with ${64 << 10} bytes, expected ${1 << 20}; mpq resizes only objects it ` +
      "creates: remove it or ask for its size";
    // In the foreground, and in daemon mode (the child reports to the waiting parent).
    for (const args of [["-F"], ["-p", `${s.dir}/pid`]]) {
      const out = await mpq([...args, "-S", s.socketPath, "-M", s.shmName, "-l", "1M"]).output();
      assert.equal(out.code, 1);
      assert.equal(new TextDecoder().decode(out.stderr).trim(), want);
      assert.equal(Deno.statSync(path).size, 64 << 10, "not resized");
      assert.deepEqual(Deno.readFileSync(path), contents, "contents untouched");
      assert.ok(!exists(s.socketPath) && !exists(`${s.dir}/pid`), "nothing left behind");
    }
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem --mode sets the socket's file mode", async () => {
  const s = scratch();
  try {
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName, "--mode", "0660"]);
    assert.equal(Deno.lstatSync(s.socketPath).mode! & 0o777, 0o660);
    assert.equal((await server.stop()).code, 0);
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem refuses to start over a live server and names the path", async () => {
  const s = scratch();
  try {
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName]);
    const second = await mpq(["-F", "-S", s.socketPath, "-M", `${s.shmName}-2`]).output();
    const err = new TextDecoder().decode(second.stderr);
    assert.equal(second.code, 1);
    assert.match(err, new RegExp(`${s.socketPath}: another server is listening there`));
    assert.ok(!exists(`/dev/shm/${s.shmName}-2`));
    assert.equal((await server.stop()).code, 0);
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem without -F daemonizes: exits 0 once listening, writes the pid file", async () => {
  const s = scratch();
  const pidfile = `${s.dir}/ivshmem.pid`;
  let pid = 0;
  try {
    const out = await mpq(["-S", s.socketPath, "-M", s.shmName, "-p", pidfile, "-n", "3"]).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    pid = Number(Deno.readTextFileSync(pidfile).trim());
    assert.ok(pid > 1);
    // A new session led by the daemon (field 6 of /proc/PID/stat is the session id).
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    assert.equal(Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[3]), pid);
    // Already listening when the parent returned.
    const p = new RawPeer(s.socketPath);
    const init = await p.recvJoin(3);
    assert.equal(init.length, 6);
    closeAll(init);
    p.close();
    assert.ok(kill(pid, Signal.SIGTERM));
    await eventually(() => !exists(s.socketPath) && !exists(pidfile), "the daemon to clean up");
    assert.ok(!exists(`/dev/shm/${s.shmName}`));
    pid = 0;
  } finally {
    if (pid) kill(pid, Signal.SIGKILL);
    s.remove();
  }
});

Deno.test("mpq ivshmem daemon start-up errors reach the parent: exit 1 naming path and errno", async () => {
  const s = scratch();
  try {
    const bad = await mpq(["-S", `${s.dir}/missing/sock`, "-M", s.shmName, "-p", `${s.dir}/pid`]).output();
    assert.equal(bad.code, 1);
    assert.match(new TextDecoder().decode(bad.stderr), /missing\/sock: ENOENT/);
    const pid = await mpq(["-S", s.socketPath, "-M", s.shmName, "-p", `${s.dir}/nodir/pid`]).output();
    assert.equal(pid.code, 1);
    assert.match(new TextDecoder().decode(pid.stderr), /cannot write pid file .*nodir\/pid/);
    assert.ok(!exists(s.socketPath) && !exists(`/dev/shm/${s.shmName}`), "nothing left behind");
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem flag errors name the flag, print usage and exit 1; -h exits 0", async () => {
  const cases: Array<[string[], RegExp]> = [
    [["-F", "-n", "65"], /-n\/--vectors must be 1..64: got 65/],
    [["-F", "-l", "lots"], /-l\/--size: not a size: "lots"/],
    [["-v"], /-v\/--verbose: cannot use verbose in daemon mode/],
    [["-F", "--bogus"], /--bogus/],
    [["client", "--notify", "x"], /--notify: expected A:B/],
  ];
  for (const [args, pattern] of cases) {
    const out = await mpq(args).output();
    const err = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 1, `${args.join(" ")}: ${err}`);
    assert.match(err, pattern);
    assert.match(err, /Usage: mpq ivshmem/);
  }
  const help = await mpq(["-h"]).output();
  assert.equal(help.code, 0);
  assert.match(new TextDecoder().decode(help.stdout), /-S, --socket-path <path>/);
});

/** A client process whose stdout is read line by line. */
class ClientProcess {
  readonly child: Deno.ChildProcess;
  readonly lines: string[] = [];
  readonly #done: Promise<void>;

  constructor(args: string[], stdin: "piped" | "null" = "null") {
    const [exe, ...pre] = selfCommand();
    const child = new Deno.Command(exe, {
      args: [...pre, "ivshmem", "client", ...args],
      stdin,
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.child = child;
    this.#done = (async () => {
      let rest = "";
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + chunk).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
      }
      if (rest) this.lines.push(rest);
    })();
  }

  async waitLine(match: (l: string) => boolean): Promise<string> {
    await eventually(() => this.lines.some(match), "a client output line");
    return this.lines.find(match)!;
  }

  async exit(): Promise<number> {
    const st = await this.child.status;
    await this.#done;
    return st.code;
  }
}

Deno.test("mpq ivshmem client --json: --wait, --notify, --write and --read between two clients", async () => {
  const s = scratch();
  try {
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName, "-n", "2", "-l", "64K"]);
    try {
      const waiter = new ClientProcess([
        "-S",
        s.socketPath,
        "--json",
        "--wait",
        "2",
        "--timeout",
        "30",
        "--read",
        "16:4",
      ]);
      await waiter.waitLine((l) => l.includes('"joined"'));
      const ringer = await mpq([
        "client",
        "-S",
        s.socketPath,
        "--json",
        "--write",
        "16:c0ffee01",
        "--notify",
        "0:all",
      ]).output();
      assert.equal(ringer.code, 0);
      const ringerLines = new TextDecoder().decode(ringer.stdout).trim().split("\n").map((l) =>
        JSON.parse(l)
      );
      assert.deepEqual(ringerLines, [
        { event: "joined", id: 1, vectors: 2, peers: [0], shmSize: 65536 },
        { event: "write", offset: 16, length: 4 },
        { event: "notified", peer: 0, vector: 0 },
        { event: "notified", peer: 0, vector: 1 },
      ]);
      assert.equal(await waiter.exit(), 0);
      const events = waiter.lines.map((l) => JSON.parse(l));
      assert.deepEqual(events[0], { event: "joined", id: 0, vectors: 2, peers: [], shmSize: 65536 });
      assert.deepEqual(events[1], { event: "peer-joined", peer: 1, vectors: 2 });
      const notes = events.filter((e) => e.event === "notification");
      assert.deepEqual(notes.map((e) => e.vector).sort(), [0, 1]);
      assert.deepEqual(events.at(-1), { event: "read", offset: 16, length: 4, hex: "c0ffee01" });
    } finally {
      assert.equal((await server.stop()).code, 0);
    }
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem client --notify waits for the peer to join; --wait --timeout exits 2", async () => {
  const s = scratch();
  try {
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName]);
    try {
      // Peer 1 does not exist yet: the notify waits for it.
      const early = new ClientProcess(["-S", s.socketPath, "--json", "--notify", "1:0", "--timeout", "30"]);
      await early.waitLine((l) => l.includes('"joined"'));
      const late = new ClientProcess(["-S", s.socketPath, "--json", "--wait", "1", "--timeout", "30"]);
      assert.equal(await early.exit(), 0);
      assert.ok(early.lines.some((l) => l === JSON.stringify({ event: "notified", peer: 1, vector: 0 })));
      assert.equal(await late.exit(), 0);
      assert.ok(late.lines.some((l) => l === JSON.stringify({ event: "notification", vector: 0, count: 1 })));

      const lonely = new ClientProcess(["-S", s.socketPath, "--json", "--wait", "1", "--timeout", "0.5"]);
      assert.equal(await lonely.exit(), 2);
      assert.deepEqual(JSON.parse(lonely.lines.at(-1)!), { event: "timeout", notifications: 0 });
    } finally {
      assert.equal((await server.stop()).code, 0);
    }
  } finally {
    s.remove();
  }
});

Deno.test("mpq ivshmem client interactive: int, dump and quit from stdin", async () => {
  const s = scratch();
  try {
    const server = await ServerProcess.start(["-S", s.socketPath, "-M", s.shmName, "-n", "2"]);
    try {
      const c = new ClientProcess(["-S", s.socketPath], "piped");
      const stdin = c.child.stdin.getWriter();
      await c.waitLine((l) => l.startsWith("our_id = 0"));
      await stdin.write(new TextEncoder().encode("int 0 1\n"));
      await c.waitLine((l) => l.includes("receive notification on vector=1 (count 1)"));
      await stdin.write(new TextEncoder().encode("int 9 0\nbogus\ndump\nquit\n"));
      await stdin.close();
      assert.equal(await c.exit(), 0);
      const out = c.lines.join("\n");
      assert.match(out, /cannot find peer_id = 9/);
      assert.match(out, /invalid command, type help/);
      assert.match(out, /our_id = 0\n {2}vector 0 is enabled\n {2}vector 1 is enabled/);
    } finally {
      assert.equal((await server.stop()).code, 0);
    }
  } finally {
    s.remove();
  }
});

for (const vectors of [16, 1]) {
  Deno.test(`mpq ivshmem out of fds (${vectors} vectors): a peer it cannot serve is closed, the server keeps serving`, async () => {
    const s = scratch();
    try {
      // Each peer costs 1 + vectors fds; the limit leaves room for two peers and a few fds, so the
      // next peer fails either at accept (refused through the reserve fd) or at its eventfds.
      const [exe, ...pre] = selfCommand();
      const child = new Deno.Command("prlimit", {
        args: [
          `--nofile=${32 + 2 * (1 + vectors)}:${32 + 2 * (1 + vectors)}`,
          exe,
          ...pre,
          "ivshmem",
          "-F",
          "-v",
          "-S",
          s.socketPath,
          "-M",
          s.shmName,
          "-n",
          String(vectors),
        ],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const output = child.output();
      try {
        await eventually(() => exists(s.socketPath), "the server socket");
        await delay(200);
        const ok: RawPeer[] = [];
        let refused: RawPeer | null = null;
        for (let i = 0; i < 40 && !refused; i++) {
          const p = new RawPeer(s.socketPath);
          try {
            closeAll(await p.recvJoin(vectors));
            for (const earlier of ok) closeAll(await earlier.recvMany(vectors)); // told of p
            ok.push(p);
          } catch (e) {
            assert.match(String(e), /server closed the connection/);
            refused = p;
          }
        }
        assert.ok(refused, "some peer ran into the fd limit");
        assert.ok(ok.length >= 1, "peers before the limit were served");
        refused.close();
        // Free one peer's fds: the next one is served in full.
        ok.pop()!.close();
        for (const p of ok) {
          const msgs = await p.recvMany(1);
          assert.equal(msgs[0].fd, null, "told of the leave");
        }
        await delay(100);
        const again = new RawPeer(s.socketPath);
        const init = await again.recvJoin(vectors);
        assert.equal(init.length, 3 + vectors * (ok.length + 1));
        closeAll(init);
        again.close();
        for (const p of ok) {
          closeAll(await p.recvMany(vectors + 1)); // told of `again` joining and leaving
          p.close();
        }
      } finally {
        child.kill("SIGTERM");
        const out = await output;
        const log = new TextDecoder().decode(out.stdout);
        assert.equal(out.code, 0, log + new TextDecoder().decode(out.stderr));
        assert.match(log, /cannot set up new peer: eventfd.*EMFILE|out of fds: refused a new peer/);
      }
    } finally {
      s.remove();
    }
  });
}
