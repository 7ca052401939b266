/**
 * `mpq orchestrate --demo`: QEMU's multi-process example with no files and no guest kernel. One
 * lsi53c895a SCSI controller runs in its own `-machine x-remote` QEMU; the VM (memfd RAM, started
 * paused, QMP on a pre-opened fd) reaches it through x-pci-proxy-dev. After `cont` the firmware
 * (SeaBIOS) enumerates PCI and logs to its debug console what the guest sees: the remote device.
 * @module
 */
import type { Vm } from "./launch.ts";
import { type Topology, validateTopology } from "./topology.ts";

/** The demo topology; its debug console log lives in `runtimeDir`. */
export function demoTopology(runtimeDir: string): Topology {
  return validateTopology({
    name: "demo",
    machine: "pc",
    accel: "tcg",
    memory: "512M",
    console: "none",
    debugcon: `${runtimeDir}/seabios-debugcon.log`,
    start: "paused",
    steps: [{ execute: "query-status", expect: { status: "prelaunch" } }],
    afterStart: [{ execute: "query-status", expect: { status: "running" } }],
    devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }],
  });
}

/** The lines of a SeaBIOS debug log that show PCI enumeration and the lsi53c895a driver. */
export function firmwarePciLines(log: string): string[] {
  return log.split("\n").filter((l) => /^PCI: init bdf=|^found lsi53c895a at /.test(l));
}

/** The explanation printed before the demo starts. */
export const DEMO_INTRO =
  `mpq orchestrate --demo: multi-process QEMU from a built-in topology (no files, no guest kernel).
  An LSI53C895A SCSI controller is emulated in its own QEMU process (-machine x-remote); the VM reaches
  it through x-pci-proxy-dev over a socketpair. Guest RAM is a shared memfd. QEMU starts paused with its
  QMP monitor on a socket mpq pre-opened; mpq runs the QMP steps, then 'cont'. The firmware's PCI scan
  (SeaBIOS debug console, port 0x402) shows what the guest sees. See the plan: mpq orchestrate --demo --dry-run
`;

/**
 * Runs while the demo VM is up: waits (bounded) until SeaBIOS has finished its boot attempts, prints
 * what the firmware saw, and returns 0 if the remote device was found, else 1.
 */
export async function watchDemo(
  vm: Vm,
  options: { log: (line: string) => void; timeoutMs?: number },
): Promise<number> {
  const { log, timeoutMs = 60000 } = options;
  const path = vm.plan.debugcon;
  if (!path) throw new Error("demo plan has no debug console");
  const remote = vm.children.find((c) => c.planned.role === "remote");
  const t = performance.now();
  let text = "";
  while (performance.now() - t < timeoutMs) {
    try {
      text = Deno.readTextFileSync(path);
    } catch { /* not created yet */ }
    if (/No bootable device|Booting from /.test(text) && /found lsi53c895a/.test(text)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const lines = firmwarePciLines(text);
  log(`[${vm.elapsed()}s] ${"guest sees".padEnd(14)} firmware PCI enumeration (SeaBIOS debug console):`);
  for (const l of lines) {
    const mark = /id=1000:0012/.test(l)
      ? `   <- LSI53C895A, emulated by ${
        remote?.planned.name ?? "the remote process"
      } (pid ${remote?.process.pid})`
      : "";
    log(`${" ".repeat(25)}${l}${mark}`);
  }
  const ok = lines.some((l) => /id=1000:0012/.test(l)) && lines.some((l) => /^found lsi53c895a/.test(l));
  if (!ok) log(`${" ".repeat(25)}(the remote lsi53c895a did not appear within ${timeoutMs} ms)`);
  return ok ? 0 : 1;
}
