/**
 * Real QEMU guests for end-to-end tests: a tiny initramfs (busybox-static, the host Debian kernel's
 * virtio modules, an /init) built once and cached, a per-test script appended as a second gzip'd cpio
 * archive (concatenated archives form one initramfs), and a runner that boots
 * `qemu-system-x86_64 -accel tcg`, captures the serial console, waits for marker lines and always
 * kills QEMU at the end.
 *
 * The guest's /init mounts proc, sys and devtmpfs, installs busybox applets, loads the virtio modules
 * (virtio_ring, virtio, virtio_pci_legacy_dev, virtio_pci_modern_dev, virtio_pci, virtio_blk,
 * virtio-rng), prints `MPQ:booted`, runs the test's script as `/test.sh`, prints `MPQ:exit <status>`
 * and powers off (`poweroff -f`). The script reports results with `mark NAME [VALUE...]`, which prints
 * one marker line `MPQ:NAME VALUE...` on the console; the host reads it with `guest.waitFor("NAME")`.
 *
 * Environment: MPQ_GUEST_KERNEL (default: the newest /boot/vmlinuz-*), MPQ_QEMU (default
 * qemu-system-x86_64), MPQ_GUEST_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/mpq-test, or the temp
 * dir when there is no HOME).
 *
 * @example
 * await using guest = await Guest.start({
 *   script: `mark ivpos $(devmem 0xfe000008 32)`,
 *   args: ["-chardev", `socket,path=${sock},id=iv`, "-device", "ivshmem-doorbell,chardev=iv,vectors=1"],
 * });
 * const pos = await guest.waitFor("ivpos");   // "0x00000000"
 * await guest.waitExit();                      // the script ended and the guest powered off
 * @module
 */

/** Modules loaded by /init, in this order (missing ones are reported as `MPQ:insmod-failed NAME`). */
export const GUEST_MODULES = [
  "kernel/drivers/virtio/virtio_ring",
  "kernel/drivers/virtio/virtio",
  "kernel/drivers/virtio/virtio_pci_legacy_dev",
  "kernel/drivers/virtio/virtio_pci_modern_dev",
  "kernel/drivers/virtio/virtio_pci",
  "kernel/drivers/block/virtio_blk",
  "kernel/drivers/char/hw_random/virtio-rng",
  "kernel/fs/fuse/fuse",
  "kernel/fs/fuse/virtiofs",
] as const;

/** Default time to wait for one marker (TCG on a loaded CI machine boots in 5-60 s). */
export const DEFAULT_TIMEOUT_MS = 180_000;

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in ${GUEST_MODULES.map((m) => m.split("/").pop()).join(" ")}; do
  insmod /modules/$m.ko 2>/dev/null || echo "MPQ:insmod-failed $m"
done
echo "MPQ:booted $(uname -r)"
if [ -f /test.sh ]; then
  sh /test.sh
  echo "MPQ:exit $?"
else
  echo "MPQ:exit none"
fi
sync
poweroff -f
`;

const MARK = `#!/bin/sh
# mark NAME [VALUE...]: one marker line on the console for the host test.
n="$1"; shift
echo "MPQ:$n $*"
`;

// ---------------------------------------------------------------------------------------------
// cpio (newc) writer

/** One archive member. Directories and device nodes have no data. */
export interface CpioEntry {
  /** Path inside the archive, without a leading slash ("bin/busybox"). */
  name: string;
  /** Full st_mode including the file type bits (0o100755, 0o40755, 0o20600...). */
  mode: number;
  /** File contents (regular files) or link target (symlinks). */
  data?: Uint8Array;
  /** Device numbers for character/block nodes. */
  rdev?: [major: number, minor: number];
}

const FILE = 0o100000;
const DIR = 0o40000;
const CHR = 0o20000;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new RangeError(`cpio field out of range: ${n}`);
  return n.toString(16).padStart(8, "0");
}

/**
 * Serialises entries as a cpio "newc" (070701) archive with its TRAILER!!! record.
 * @example
 * const bytes = cpioNewc([{ name: "init", mode: 0o100755, data: new TextEncoder().encode("#!/bin/sh") }]);
 */
export function cpioNewc(entries: readonly CpioEntry[]): Uint8Array<ArrayBuffer> {
  const enc = new TextEncoder();
  const parts: Uint8Array[] = [];
  let total = 0;
  const push = (b: Uint8Array) => {
    parts.push(b);
    total += b.byteLength;
  };
  const pad = () => {
    const n = (4 - (total % 4)) % 4;
    if (n) push(new Uint8Array(n));
  };
  let ino = 1;
  for (const e of [...entries, { name: "TRAILER!!!", mode: 0 } as CpioEntry]) {
    const name = enc.encode(e.name.replace(/^\/+/, ""));
    const data = e.data ?? new Uint8Array(0);
    const isDir = (e.mode & 0o170000) === DIR;
    const header = "070701" + [
      e.name === "TRAILER!!!" ? 0 : ino++,
      e.mode,
      0, // uid
      0, // gid
      isDir ? 2 : 1, // nlink
      0, // mtime: reproducible archives
      data.byteLength,
      0, // dev major
      0, // dev minor
      e.rdev?.[0] ?? 0,
      e.rdev?.[1] ?? 0,
      name.byteLength + 1,
      0, // check
    ].map(hex8).join("");
    push(enc.encode(header));
    push(name);
    push(new Uint8Array(1));
    pad();
    if (data.byteLength) {
      push(data);
      pad();
    }
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

/** gzip through the runtime's CompressionStream. */
export async function gzip(data: Uint8Array<ArrayBuffer>): Promise<Uint8Array<ArrayBuffer>> {
  const stream = new Blob([data]).stream().pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function sha256hex(...parts: Uint8Array<ArrayBuffer>[]): Promise<string> {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let off = 0;
  for (const p of parts) {
    all.set(p, off);
    off += p.byteLength;
  }
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
  return Array.from(d.slice(0, 12), (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------------------------------------
// kernel, modules, base image

/** The guest kernel: MPQ_GUEST_KERNEL, else the newest /boot/vmlinuz-*. Throws naming what is missing. */
export function kernelPath(): string {
  const env = Deno.env.get("MPQ_GUEST_KERNEL");
  if (env) return env;
  const found: string[] = [];
  try {
    for (const e of Deno.readDirSync("/boot")) if (e.name.startsWith("vmlinuz-")) found.push(e.name);
  } catch { /* no /boot */ }
  if (found.length === 0) {
    throw new Error("no guest kernel: /boot/vmlinuz-* not found (apt-get install linux-image-amd64)");
  }
  found.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  return `/boot/${found[found.length - 1]}`;
}

/** The kernel release of a /boot/vmlinuz-<release> path, whose modules are in /lib/modules/<release>. */
export function kernelRelease(kernel = kernelPath()): string {
  const m = /vmlinuz-(.+)$/.exec(kernel);
  if (!m) throw new Error(`cannot tell the kernel release from ${kernel}: expected .../vmlinuz-<release>`);
  return m[1];
}

/** The QEMU binary (MPQ_QEMU or qemu-system-x86_64). */
export function qemuBinary(): string {
  return Deno.env.get("MPQ_QEMU") ?? "qemu-system-x86_64";
}

/** Whether QEMU, a kernel and busybox are all here, so e2e tests can run (use with `ignore:`). */
export function guestAvailable(): boolean {
  try {
    kernelPath();
    Deno.statSync(busyboxPath());
    return new Deno.Command(qemuBinary(), { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

function busyboxPath(): string {
  for (const p of ["/bin/busybox", "/usr/bin/busybox"]) {
    try {
      if (Deno.statSync(p).isFile) return p;
    } catch { /* next */ }
  }
  throw new Error("busybox not found at /bin/busybox (apt-get install busybox-static)");
}

async function readModule(base: string): Promise<Uint8Array<ArrayBuffer>> {
  try {
    return await Deno.readFile(`${base}.ko`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  for (const [ext, tool] of [[".ko.xz", "xz"], [".ko.zst", "zstd"], [".ko.gz", "gzip"]] as const) {
    try {
      Deno.statSync(base + ext);
    } catch {
      continue;
    }
    const out = await new Deno.Command(tool, { args: ["-dc", base + ext], stdout: "piped", stderr: "piped" })
      .output();
    if (!out.success) {
      throw new Error(`${tool} -dc ${base + ext} failed: ${new TextDecoder().decode(out.stderr).trim()}`);
    }
    return new Uint8Array(out.stdout);
  }
  throw new Error(`kernel module ${base}.ko (or .ko.xz/.ko.zst/.ko.gz) not found`);
}

function cacheDir(): string {
  const explicit = Deno.env.get("MPQ_GUEST_CACHE");
  if (explicit) return explicit;
  const xdg = Deno.env.get("XDG_CACHE_HOME");
  const home = Deno.env.get("HOME");
  if (xdg) return `${xdg}/mpq-test`;
  if (home) return `${home}/.cache/mpq-test`;
  return `${Deno.env.get("TMPDIR") ?? "/tmp"}/mpq-test-cache`;
}

/**
 * Builds (once; cached by content hash) the base initramfs: busybox, the virtio modules of
 * `kernelRelease()`, /init and /bin/mark. Returns the path of the gzip'd cpio.
 */
export async function baseInitramfs(): Promise<string> {
  const release = kernelRelease();
  const enc = new TextEncoder();
  const busybox = await Deno.readFile(busyboxPath());
  const modules: Array<[string, Uint8Array<ArrayBuffer>]> = [];
  for (const m of GUEST_MODULES) {
    modules.push([m.split("/").pop()!, await readModule(`/lib/modules/${release}/${m}`)]);
  }
  const key = await sha256hex(enc.encode(INIT + MARK + release), busybox, ...modules.map(([, b]) => b));
  const dir = cacheDir();
  const path = `${dir}/initramfs-${key}.cpio.gz`;
  try {
    if (Deno.statSync(path).size > 0) return path;
  } catch { /* build it */ }
  const entries: CpioEntry[] = [
    ...["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "modules"].map((
      name,
    ) => ({ name, mode: DIR | 0o755 })),
    { name: "dev/console", mode: CHR | 0o600, rdev: [5, 1] },
    { name: "dev/null", mode: CHR | 0o666, rdev: [1, 3] },
    { name: "bin/busybox", mode: FILE | 0o755, data: busybox },
    { name: "bin/mark", mode: FILE | 0o755, data: enc.encode(MARK) },
    { name: "init", mode: FILE | 0o755, data: enc.encode(INIT) },
    ...modules.map(([name, data]) => ({ name: `modules/${name}.ko`, mode: FILE | 0o644, data })),
  ];
  const gz = await gzip(cpioNewc(entries));
  Deno.mkdirSync(dir, { recursive: true });
  const tmp = `${path}.${Deno.pid}.tmp`;
  await Deno.writeFile(tmp, gz);
  Deno.renameSync(tmp, path); // atomic: concurrent builders write the same bytes
  return path;
}

/**
 * The per-test archive: /test.sh plus any extra files (paths relative to /, executable when the
 * name ends in .sh), gzip'd newc cpio to append after the base image.
 */
export async function scriptArchive(
  script: string,
  files: Readonly<Record<string, string | Uint8Array>> = {},
): Promise<Uint8Array<ArrayBuffer>> {
  const enc = new TextEncoder();
  const entries: CpioEntry[] = [{ name: "test.sh", mode: FILE | 0o755, data: enc.encode(`${script}\n`) }];
  for (const [name, content] of Object.entries(files)) {
    entries.push({
      name: name.replace(/^\/+/, ""),
      mode: FILE | (name.endsWith(".sh") ? 0o755 : 0o644),
      data: typeof content === "string" ? enc.encode(content) : content,
    });
  }
  return await gzip(cpioNewc(entries));
}

/** Writes base image + script archive as one initrd file at `path`. */
export async function writeInitrd(
  path: string,
  script: string,
  files: Readonly<Record<string, string | Uint8Array>> = {},
): Promise<void> {
  const base = await Deno.readFile(await baseInitramfs());
  const extra = await scriptArchive(script, files);
  const out = new Uint8Array(base.byteLength + extra.byteLength);
  out.set(base);
  out.set(extra, base.byteLength);
  await Deno.writeFile(path, out);
}

// ---------------------------------------------------------------------------------------------
// the runner

/** Options for Guest.start. */
export interface GuestOptions {
  /** Shell script run as /test.sh after boot (busybox sh; `mark NAME VALUE` reports to the host). */
  script: string;
  /** Extra files for the guest, path -> content. */
  files?: Readonly<Record<string, string | Uint8Array>>;
  /** Extra QEMU arguments (devices, chardevs, objects). */
  args?: readonly string[];
  /** Guest RAM in MiB (default 512). */
  memoryMiB?: number;
  /** QEMU machine type (`-machine`: "pc", "q35", ...; default: QEMU's default, the i440fx "pc"). */
  machine?: string;
  /**
   * Back guest RAM with a shared memfd (`memory-backend-memfd,share=on` as NUMA node 0), which
   * vhost-user back-ends need to map guest memory.
   */
  sharedMemory?: boolean;
  /** Extra kernel command line. */
  append?: string;
  /** A name for error messages ("guest A"). */
  name?: string;
}

interface Waiter {
  test: (line: string) => RegExpMatchArray | null;
  resolve: (m: RegExpMatchArray) => void;
  reject: (e: Error) => void;
  what: string;
}

const MARKER = /MPQ:([\w.-]+)(?: (.*))?$/;

/**
 * A running QEMU guest. Always `close()` it (or `await using`): that kills QEMU, reaps it and
 * removes its temp dir, even when the test failed half way.
 */
export class Guest {
  /** The QEMU command line, for error messages. */
  readonly argv: readonly string[];
  /** The temp dir holding the initrd (removed by close()). */
  readonly dir: string;
  readonly name: string;
  readonly #child: Deno.ChildProcess;
  readonly #readers: Promise<void>[];
  readonly #lines: string[] = [];
  readonly #waiters = new Set<Waiter>();
  #partial = "";
  #stderr = "";
  #status: Deno.CommandStatus | null = null;
  readonly #exited: Promise<Deno.CommandStatus>;

  private constructor(child: Deno.ChildProcess, argv: string[], dir: string, name: string) {
    this.#child = child;
    this.argv = argv;
    this.dir = dir;
    this.name = name;
    this.#readers = [this.#read(child.stdout, false), this.#read(child.stderr, true)];
    this.#exited = child.status.then(async (st) => {
      await Promise.all(this.#readers);
      this.#status = st;
      if (this.#partial) this.#line(this.#partial);
      this.#partial = "";
      for (const w of this.#waiters) {
        w.reject(new Error(`${this.name}: QEMU exited (${describe(st)}) before ${w.what}\n${this.tail()}`));
      }
      this.#waiters.clear();
      return st;
    });
  }

  /** Builds the initrd and starts QEMU (TCG, serial console on stdout, no reboot on panic). */
  static async start(options: GuestOptions): Promise<Guest> {
    const dir = await Deno.makeTempDir({ prefix: "mpq-guest-" });
    try {
      const initrd = `${dir}/initrd.img`;
      await writeInitrd(initrd, options.script, options.files);
      const mem = options.memoryMiB ?? 512;
      const argv = [
        qemuBinary(),
        ...(options.machine ? ["-machine", options.machine] : []),
        "-accel",
        "tcg",
        "-m",
        `${mem}`,
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
        kernelPath(),
        "-initrd",
        initrd,
        "-append",
        `console=ttyS0 panic=-1 quiet loglevel=3 ${options.append ?? ""}`.trim(),
        ...(options.sharedMemory
          ? [
            "-object",
            `memory-backend-memfd,id=mem0,size=${mem}M,share=on`,
            "-numa",
            "node,memdev=mem0",
          ]
          : []),
        ...(options.args ?? []),
      ];
      const child = new Deno.Command(argv[0], {
        args: argv.slice(1),
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      return new Guest(child, argv, dir, options.name ?? "guest");
    } catch (e) {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      throw e;
    }
  }

  async #read(stream: ReadableStream<Uint8Array>, isStderr: boolean): Promise<void> {
    const dec = new TextDecoder();
    for await (const chunk of stream) {
      const text = dec.decode(chunk, { stream: true });
      if (isStderr) {
        this.#stderr += text;
        continue;
      }
      const parts = (this.#partial + text).split("\n");
      this.#partial = parts.pop()!;
      for (const p of parts) this.#line(p);
    }
  }

  #line(raw: string): void {
    const line = raw.replace(/\r/g, "");
    this.#lines.push(line);
    for (const w of this.#waiters) {
      const m = w.test(line);
      if (m) {
        this.#waiters.delete(w);
        w.resolve(m);
      }
    }
  }

  /** Every complete console line so far (no \r). */
  get lines(): readonly string[] {
    return this.#lines;
  }

  /** QEMU's pid. */
  get pid(): number {
    return this.#child.pid;
  }

  /** The last console lines and QEMU's stderr, for failure messages. */
  tail(n = 40): string {
    const out = this.#lines.slice(-n).join("\n");
    return `--- ${this.name} console (last ${n} lines) ---\n${out}${this.#partial}\n--- QEMU stderr ---\n${this.#stderr}`;
  }

  /**
   * Waits for the first console line (already seen or still to come) matching `pattern`.
   * Rejects when QEMU exits first or after `timeoutMs`, with the console tail in the message.
   */
  waitForLine(pattern: RegExp, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<RegExpMatchArray> {
    return this.#wait((l) => pattern.exec(l), `a line matching ${pattern}`, timeoutMs);
  }

  /**
   * Waits for the marker `MPQ:NAME VALUE` and returns VALUE ("" when none).
   * `mark NAME VALUE` in the guest script prints it.
   */
  async waitFor(name: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<string> {
    const m = await this.#wait(
      (l) => {
        const r = MARKER.exec(l);
        return r && r[1] === name ? r : null;
      },
      `marker MPQ:${name}`,
      timeoutMs,
    );
    return (m[2] ?? "").trim();
  }

  /** Every marker seen so far, as [name, value] in order. */
  markers(): Array<[string, string]> {
    const out: Array<[string, string]> = [];
    for (const l of this.#lines) {
      const m = MARKER.exec(l);
      if (m) out.push([m[1], (m[2] ?? "").trim()]);
    }
    return out;
  }

  #wait(
    test: (line: string) => RegExpMatchArray | null,
    what: string,
    timeoutMs: number,
  ): Promise<RegExpMatchArray> {
    for (const l of this.#lines) {
      const m = test(l);
      if (m) return Promise.resolve(m);
    }
    if (this.#status) {
      return Promise.reject(
        new Error(`${this.name}: QEMU exited (${describe(this.#status)}) before ${what}\n${this.tail()}`),
      );
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(w);
        reject(new Error(`${this.name}: no ${what} within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      const w: Waiter = {
        test,
        what,
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.#waiters.add(w);
    });
  }

  /**
   * Waits for the guest to finish its script and power off; returns the script's exit status
   * (`MPQ:exit`). Throws if QEMU does not exit within `timeoutMs` or the script status is not a number.
   */
  async waitExit(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const st = await Promise.race([
      this.#exited,
      new Promise<null>((r) => (timer = setTimeout(() => r(null), timeoutMs))),
    ]).finally(() => clearTimeout(timer));
    if (st === null) {
      throw new Error(`${this.name}: QEMU still running after ${timeoutMs} ms\n${this.tail()}`);
    }
    const exit = this.markers().findLast(([n]) => n === "exit");
    if (!exit || !/^\d+$/.test(exit[1])) {
      throw new Error(`${this.name}: no script exit status (QEMU ${describe(st)})\n${this.tail()}`);
    }
    return Number(exit[1]);
  }

  /** Kills QEMU (SIGKILL) if it still runs, reaps it, and removes the temp dir. Idempotent. */
  async close(): Promise<void> {
    if (!this.#status) {
      try {
        this.#child.kill("SIGKILL");
      } catch { /* already exited */ }
    }
    await this.#exited;
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function describe(st: Deno.CommandStatus): string {
  return st.signal ? `killed by ${st.signal}` : `exit ${st.code}`;
}
