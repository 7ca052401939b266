/**
 * End to end: real QEMU 7.2 guests (TCG) with `-device ivshmem-doorbell` connected to `mpq ivshmem`
 * (spawned as a process), talking to our TypeScript client and to each other.
 *
 * The guests have no ivshmem driver: they find the device in sysfs, read BAR0 registers
 * (IVPosition at 8, Doorbell at 12) and the shared memory BAR2 with busybox `devmem`. To observe a
 * doorbell aimed at them they enable MSI-X with every vector masked (config-space write); QEMU
 * then records a rung vector as a pending bit in the MSI-X PBA, which the guest polls.
 * @module
 */
import assert from "node:assert/strict";
import { Reactor } from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { IvshmemClient, type IvshmemEvent } from "../../lib/ivshmem/mod.ts";
import { Guest, guestAvailable } from "../helpers/guest.ts";

const ignore = !guestAvailable();
const VECTORS = 2;
const EVENT_TIMEOUT_MS = 180_000;

/** Shell functions for the guest: locate the ivshmem device, its BARs and its MSI-X PBA. */
const GUEST_LIB = String.raw`
set -e
dev=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then dev=$d; fi
done
[ -n "$dev" ] || { mark error "no ivshmem device (1af4:1110) in /sys/bus/pci/devices"; exit 1; }
echo 1 > $dev/enable
bar() { set -- $(sed -n "$(($1 + 1))p" $dev/resource); echo $(($1)); }
bar0=$(bar 0)
bar2=$(bar 2)
rd() { echo $(( $(devmem $1 32) )); }
wr() { devmem $1 32 $2; }
cfgb() { od -An -tu1 -j $1 -N 1 $dev/config | tr -d ' \n'; }
cfgd() { od -An -tu4 -j $1 -N 4 $dev/config | tr -d ' \n'; }
# MSI-X on with the function masked: a doorbell for us becomes a pending bit in the PBA.
msix_masked() {
  cap=$(cfgb 52)
  while [ "$cap" -ne 0 ] && [ "$(cfgb $cap)" -ne 17 ]; do cap=$(cfgb $((cap + 1))); done
  [ "$cap" -ne 0 ] || { mark error "no MSI-X capability"; exit 1; }
  pba=$(cfgd $((cap + 8)))
  pba_addr=$(( $(bar $((pba & 7))) + (pba & ~7) ))
  printf '\300' | dd of=$dev/config bs=1 seek=$((cap + 3)) count=1 conv=notrunc 2>/dev/null
  [ $(( $(cfgb $((cap + 3))) & 192 )) -eq 192 ] || { mark error "MSI-X enable did not stick"; exit 1; }
}
# wait_pending VECTOR: poll the PBA until the vector's bit is set (at least 300 s).
wait_pending() {
  i=0
  while [ $(( $(rd $pba_addr) >> $1 & 1 )) -eq 0 ]; do
    i=$((i + 1))
    [ $i -lt 3000 ] || { mark error "vector $1 never became pending"; exit 1; }
    sleep 0.1
  done
}
ivpos=$(rd $((bar0 + 8)))
mark ivposition $ivpos
`;

/** `mpq ivshmem -F` as a child process; resolves once it listens. */
class ServerProcess {
  readonly child: Deno.ChildProcess;
  readonly #stdout: Promise<string>;
  readonly #stderr: Promise<string>;
  #out = "";

  constructor(readonly socketPath: string, readonly shmName: string) {
    const [exe, ...pre] = selfCommand();
    this.child = new Deno.Command(exe, {
      args: [...pre, "ivshmem", "-F", "-S", socketPath, "-M", shmName, "-l", "1M", "-n", String(VECTORS)],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdout = this.#collect(this.child.stdout, true);
    this.#stderr = this.#collect(this.child.stderr, false);
  }

  async #collect(stream: ReadableStream<Uint8Array>, isOut: boolean): Promise<string> {
    let all = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      all += chunk;
      if (isOut) this.#out = all;
    }
    return all;
  }

  /** Waits for "listening on PATH" (the server is accepting peers). */
  async listening(): Promise<void> {
    const end = Date.now() + 30_000;
    while (!this.#out.includes(`listening on ${this.socketPath}`)) {
      if (Date.now() > end) throw new Error(`mpq ivshmem did not start listening: ${await this.stop()}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** SIGTERM, reap, and return what it printed. */
  async stop(): Promise<string> {
    try {
      this.child.kill("SIGTERM");
    } catch { /* already exited */ }
    const st = await this.child.status;
    return `exit ${st.code}${st.signal ? ` (${st.signal})` : ""}\n${await this.#stdout}${await this.#stderr}`;
  }
}

/** Scratch dir, server process and a running reactor; dispose() undoes all of it. */
async function setup() {
  const dir = await Deno.makeTempDir({ prefix: "mpq-ivshmem-e2e-" });
  const socketPath = `${dir}/ivshmem.sock`;
  const shmName = `mpq-e2e-${crypto.randomUUID().slice(0, 8)}`;
  const server = new ServerProcess(socketPath, shmName);
  const reactor = new Reactor();
  const running = reactor.run();
  const cleanups: Array<() => Promise<void> | void> = [];
  return {
    dir,
    socketPath,
    shmName,
    server,
    reactor,
    defer(fn: () => Promise<void> | void) {
      cleanups.push(fn);
    },
    async dispose() {
      for (const fn of cleanups.reverse()) await fn();
      reactor.stop();
      await running;
      reactor.close();
      const out = await server.stop();
      await Deno.remove(dir, { recursive: true });
      try {
        Deno.removeSync(`/dev/shm/${shmName}`);
      } catch { /* the server removed it, as it should */ }
      return out;
    },
  };
}

function ivshmemArgs(socketPath: string, id: string): string[] {
  return [
    "-chardev",
    `socket,path=${socketPath},id=${id}`,
    "-device",
    `ivshmem-doorbell,chardev=${id},vectors=${VECTORS}`,
  ];
}

const PATTERN = [0x31515050, 0xdeadbeef, 0x01020304, 0xa5a5a5a5];

function le32(words: number[]): Uint8Array {
  const out = new Uint8Array(words.length * 4);
  const v = new DataView(out.buffer);
  words.forEach((w, i) => v.setUint32(i * 4, w, true));
  return out;
}

Deno.test({
  name: "ivshmem e2e a QEMU guest and our client share memory and ring each other's doorbells",
  ignore,
  sanitizeResources: true,
  fn: async () => {
    const env = await setup();
    let guest: Guest | null = null;
    try {
      await env.server.listening();
      const client = await IvshmemClient.connect(env.reactor, env.socketPath);
      env.defer(() => client.close());
      assert.equal(client.id, 0, "the first peer gets id 0");
      assert.equal(client.shmSize, 1 << 20);
      client.write(0, le32([0xcafef00d]));

      const script = GUEST_LIB + String.raw`
mark shm0 $(rd $bar2)
i=0
for w in ${PATTERN.join(" ")}; do wr $((bar2 + 0x1000 + 4 * i)) $w; i=$((i + 1)); done
msix_masked
mark pba-before $(rd $pba_addr)
mark msix-ready
wr $((bar0 + 12)) $(( (0 << 16) | 1 ))
mark rang
wait_pending 0
mark pending $(rd $pba_addr)
`;
      guest = await Guest.start({ script, args: ivshmemArgs(env.socketPath, "iv"), name: "ivshmem guest" });
      const joined = await client.next((e) => e.event === "peer-joined", { timeoutMs: EVENT_TIMEOUT_MS });
      assert.deepEqual(joined, { event: "peer-joined", peer: 1, vectors: VECTORS });

      // The guest reads its IVPosition and the word our client wrote before it booted.
      assert.equal(Number(await guest.waitFor("ivposition")), 1);
      assert.equal(Number(await guest.waitFor("shm0")), 0xcafef00d);

      // It writes a pattern into BAR2, which we read from the shm, and rings our vector 1.
      await guest.waitFor("rang");
      const note = await client.next((e) => e.event === "notification", { timeoutMs: EVENT_TIMEOUT_MS });
      assert.equal((note as Extract<IvshmemEvent, { event: "notification" }>).vector, 1);
      assert.deepEqual(client.read(0x1000, 16), le32(PATTERN));

      // We ring its vector 0; with MSI-X masked the guest sees it as a pending bit.
      await guest.waitFor("msix-ready");
      assert.equal(Number(await guest.waitFor("pba-before")), 0, "nothing pending before we ring");
      client.notify(1, 0);
      assert.equal(Number(await guest.waitFor("pending")) & 1, 1);
      assert.equal(await guest.waitExit(), 0, guest.tail());
      assert.deepEqual(guest.markers().filter(([n]) => n === "error"), []);

      // The guest powered off: the server tells us it left.
      const left = await client.next((e) => e.event === "peer-left", { timeoutMs: EVENT_TIMEOUT_MS });
      assert.deepEqual(left, { event: "peer-left", peer: 1 });
    } finally {
      await guest?.close();
      await env.dispose();
    }
    assert.throws(() => Deno.lstatSync(env.socketPath), Deno.errors.NotFound);
    assert.throws(() => Deno.statSync(`/dev/shm/${env.shmName}`), Deno.errors.NotFound);
  },
});

Deno.test({
  name: "ivshmem e2e two QEMU guests find each other's ids through the shm and ring each other",
  ignore,
  fn: async () => {
    const env = await setup();
    const guests: Guest[] = [];
    try {
      await env.server.listening();
      // Each guest posts (id + 1) in a mailbox slot in BAR2 once its MSI-X is ready, finds the
      // other's slot, rings the other's vector 1, and waits for its own vector 1 to be pending.
      const script = GUEST_LIB + String.raw`
msix_masked
wr $((bar2 + 0x100 + 4 * ivpos)) $((ivpos + 1))
other=
n=0
while [ -z "$other" ]; do
  for j in 0 1 2 3 4 5 6 7; do
    [ $j -ne $ivpos ] && [ $(rd $((bar2 + 0x100 + 4 * j))) -eq $((j + 1)) ] && other=$j
  done
  n=$((n + 1))
  [ $n -lt 3000 ] || { mark error "the other guest never posted its id"; exit 1; }
  [ -n "$other" ] || sleep 0.1
done
mark other $other
wr $((bar0 + 12)) $(( (other << 16) | 1 ))
mark rang
wait_pending 1
mark pending $(rd $pba_addr)
# Stay up until the other guest has seen our ring too (it clears its slot when done).
wr $((bar2 + 0x200 + 4 * ivpos)) 1
n=0
while [ $(rd $((bar2 + 0x200 + 4 * other))) -ne 1 ] && [ $n -lt 1200 ]; do n=$((n + 1)); sleep 0.1; done
`;
      // Both boot at once (TCG boots are slow); which QEMU connects first, and so gets id 0, is open.
      for (const name of ["guest A", "guest B"]) {
        guests.push(await Guest.start({ script, args: ivshmemArgs(env.socketPath, "iv"), name }));
      }
      const idA = Number(await guests[0].waitFor("ivposition"));
      const idB = Number(await guests[1].waitFor("ivposition"));
      assert.deepEqual([idA, idB].sort(), [0, 1], "the two peers got ids 0 and 1");
      assert.equal(Number(await guests[0].waitFor("other")), idB);
      assert.equal(Number(await guests[1].waitFor("other")), idA);
      for (const g of guests) {
        assert.equal(Number(await g.waitFor("pending")) & 0b10, 0b10, `${g.name}: vector 1 was rung`);
      }
      for (const g of guests) assert.equal(await g.waitExit(), 0, g.tail());
      for (const g of guests) assert.deepEqual(g.markers().filter(([n]) => n === "error"), [], g.tail());
    } finally {
      for (const g of guests) await g.close();
      await env.dispose();
    }
  },
});
