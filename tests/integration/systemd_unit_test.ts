/**
 * The systemd units in contrib/ as systemd would run them: the ExecStart of mpq-vm@.service, with
 * %i filled in and NOTIFY_SOCKET set to a datagram socket the test listens on, must report READY=1
 * once the guest runs, STATUS= lines, and STOPPING=1 when SIGTERM (systemctl stop) arrives; exit 0.
 * The vhost daemon's unit likewise reports READY=1 once it listens.
 */
import assert from "node:assert/strict";
import { bindDatagram, type DatagramSocket } from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { qemuAvailable } from "../e2e/orchestrate_harness.ts";

const ROOT = new URL("../../", import.meta.url).pathname;

/** The ExecStart= argv of a unit file, with %i replaced. */
function execStart(unit: string, instance: string): string[] {
  const text = Deno.readTextFileSync(`${ROOT}contrib/systemd/${unit}`);
  const line = text.split("\n").find((l) => l.startsWith("ExecStart="));
  assert.ok(line, `${unit} has an ExecStart`);
  return line.slice("ExecStart=".length).replaceAll("%i", instance).split(/\s+/);
}

/** Collects notification datagrams until `until` matches one, within `ms`. */
async function notifications(rx: DatagramSocket, seen: string[], until: RegExp, ms = 60_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    for (let d = rx.receive(); d; d = rx.receive()) seen.push(new TextDecoder().decode(d));
    if (seen.some((s) => until.test(s))) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`no notification matching ${until} within ${ms} ms: ${JSON.stringify(seen)}`);
}

Deno.test({
  name:
    "systemd mpq-vm@.service: ExecStart with NOTIFY_SOCKET reports READY=1 when the guest runs, STOPPING=1 on SIGTERM, exit 0",
  ignore: !qemuAvailable(),
  async fn() {
    const dir = Deno.makeTempDirSync({ prefix: "mpq-systemd-" });
    try {
      Deno.writeTextFileSync(
        `${dir}/vm1.json`,
        JSON.stringify({ name: "vm1", memory: "32M", console: "none" }),
      );
      const argv = execStart("mpq-vm@.service", "vm1");
      assert.deepEqual(argv, ["/usr/bin/mpq", "orchestrate", "/etc/mpq/vm1.json"]);
      // This machine's mpq and topology directory stand in for /usr/bin/mpq and /etc/mpq.
      const [exe, ...pre] = selfCommand();
      const args = [...pre, argv[1], argv[2].replace("/etc/mpq", dir)];
      using rx = bindDatagram(`${dir}/notify.sock`);
      const child = new Deno.Command(exe, {
        args,
        env: { NOTIFY_SOCKET: rx.path },
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const seen: string[] = [];
      try {
        await notifications(rx, seen, /^READY=1$/m);
        assert.match(seen.join("\n"), /^STATUS=starting$/m);
        assert.match(seen.join("\n"), /^STATUS=guest running \(1 processes\)$/m);
        child.kill("SIGTERM");
        await notifications(rx, seen, /^STOPPING=1$/m);
      } finally {
        const st = await child.output();
        assert.equal(st.code, 0, new TextDecoder().decode(st.stderr));
      }
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test("systemd mpq-vhost-blk@.service: the daemon reports READY=1 once it listens and STOPPING=1 on SIGTERM", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-systemd-" });
  try {
    const img = `${dir}/disk0.img`;
    Deno.writeFileSync(img, new Uint8Array(1 << 20));
    const argv = execStart("mpq-vhost-blk@.service", "disk0");
    assert.equal(argv[1], "vhost");
    const [exe, ...pre] = selfCommand();
    // The unit's socket comes from its .socket unit; here a path stands in for it.
    const args = [
      ...pre,
      ...argv.slice(1).filter((a) => !a.startsWith("--metrics")).map((a) => a.replace("/var/lib/mpq", dir)),
      `--socket-path=${dir}/disk0.sock`,
    ];
    using rx = bindDatagram(`${dir}/notify.sock`);
    const child = new Deno.Command(exe, {
      args,
      env: { NOTIFY_SOCKET: rx.path },
      stdout: "null",
      stderr: "piped",
    })
      .spawn();
    const seen: string[] = [];
    try {
      await notifications(rx, seen, /^READY=1$/m);
      assert.match(seen.join("\n"), new RegExp(`^STATUS=listening on ${dir}/disk0.sock$`, "m"));
      child.kill("SIGTERM");
      await notifications(rx, seen, /^STOPPING=1$/m);
    } finally {
      const st = await child.output();
      assert.equal(st.code, 0, new TextDecoder().decode(st.stderr));
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
