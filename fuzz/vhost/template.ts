/**
 * Valid message sequences recorded from the TypeScript front-end (tests/helpers/vhost_frontend.ts)
 * talking to the daemon under test: its handshake, start and stop, byte for byte, with each fd
 * named by its role ("mem", "kick0", "inflight", ...) so any fuzz front-end with the same layout
 * can replay them with its own fds. Recorded once per run, in three flavours of what QEMU may
 * negotiate (memory slots or one table, inflight tracking or not, REPLY_ACK on every SET_*).
 * @module
 */
import type { OwnedFd } from "../../ffi/mod.ts";
import {
  Blk,
  type FrontendOptions,
  HEADER_SIZE,
  reqName,
  VhostUserFrontend,
} from "../../tests/helpers/vhost_frontend.ts";
import { patternBytes } from "../../tests/helpers/vhost_backends.ts";
import type { FdRole } from "./fd_pool.ts";
import { allocateLayout, frontendOptions, type FuzzDevice, type Layout, sameLayout } from "./layout.ts";

/** One recorded message. */
export interface TemplateMsg {
  request: number;
  flags: number;
  payload: Uint8Array<ArrayBuffer>;
  fds: FdRole[];
}

/** A recorded session, in three parts. */
export interface Template {
  name: string;
  handshake: TemplateMsg[];
  start: TemplateMsg[];
  stop: TemplateMsg[];
}

/** The front-end choices each template is recorded with. */
export const TEMPLATE_VARIANTS: ReadonlyArray<
  { name: string } & Pick<FrontendOptions, "memSlots" | "inflight" | "ackAll">
> = [
  { name: "qemu", memSlots: true, inflight: true, ackAll: false },
  { name: "table+ack", memSlots: false, inflight: false, ackAll: true },
  { name: "slots+inflight+ack", memSlots: true, inflight: true, ackAll: true },
];

function roleOf(fe: VhostUserFrontend, fd: OwnedFd): FdRole {
  if (fd === fe.ram.memfd) return "mem";
  if (fe.inflight && fd === fe.inflight.fd) return "inflight";
  for (const q of fe.queues) {
    if (fd === q.kick.fd) return `kick${q.index}`;
    if (fd === q.call.fd) return `call${q.index}`;
    if (fd === q.err.fd) return `err${q.index}`;
  }
  throw new Error(`recording: the front-end sent an fd it does not own (${fd.label})`);
}

/**
 * Records every template against the daemon listening on `socketPath`, and returns them with the
 * layout the recording front-ends had (every fuzz front-end must have the same).
 * @example
 * const { layout, templates } = await recordTemplates(sock, "blk", 5000);
 */
export async function recordTemplates(
  socketPath: string,
  device: FuzzDevice,
  timeoutMs: number,
): Promise<{ layout: Layout; templates: Template[] }> {
  let layout: Layout | null = null;
  const templates: Template[] = [];
  for (const v of TEMPLATE_VARIANTS) {
    const { name, ...choices } = v;
    const fe = await VhostUserFrontend.connect(socketPath, {
      ...frontendOptions(device, timeoutMs),
      ...choices,
    });
    try {
      const l = allocateLayout(fe, device);
      if (layout && !sameLayout(layout, l)) {
        throw new Error(`template ${name}: front-end RAM laid out differently`);
      }
      layout ??= l;
      const log: TemplateMsg[] = [];
      const sendRaw = fe.sendRaw.bind(fe);
      // Every message the front-end sends goes through sendRaw: record it on the way out.
      fe.sendRaw = (bytes, fds = []) => {
        const h = new DataView(bytes.buffer, bytes.byteOffset);
        log.push({
          request: h.getUint32(0, true),
          flags: h.getUint32(4, true),
          payload: bytes.slice(HEADER_SIZE),
          fds: fds.map((f) => roleOf(fe, f)),
        });
        sendRaw(bytes, fds);
      };
      await fe.handshake();
      const handshake = log.splice(0);
      await fe.start();
      const start = log.splice(0);
      await checkIo(fe, device, name);
      await fe.stop();
      const stop = log.splice(0);
      templates.push({ name, handshake, start, stop });
    } finally {
      await fe.close();
    }
  }
  return { layout: layout!, templates };
}

async function checkIo(fe: VhostUserFrontend, device: FuzzDevice, name: string): Promise<void> {
  for (const q of fe.queues) {
    if (device === "rng") {
      const r = await fe.rngRead(64, q.index);
      if (r.len !== 64) throw new Error(`template ${name}: rng read returned ${r.len} bytes, expected 64`);
      continue;
    }
    const data = patternBytes(4096, 900 + q.index);
    const w = await fe.blkWrite(8 * q.index, data, q.index);
    const r = await fe.blkRead(8 * q.index, 4096, q.index);
    if (w.status !== Blk.S_OK || r.status !== Blk.S_OK || r.data.some((b, i) => b !== data[i])) {
      throw new Error(
        `template ${name}: I/O on queue ${q.index} failed (write ${w.status}, read ${r.status})`,
      );
    }
  }
}

/** "SET_VRING_KICK" lines of a template, for printing. */
export function describeTemplate(t: Template): string[] {
  const line = (m: TemplateMsg) => `${reqName(m.request)}${m.fds.length ? ` [${m.fds.join(", ")}]` : ""}`;
  return [
    `template ${t.name}:`,
    `  handshake: ${t.handshake.map(line).join(", ")}`,
    `  start: ${t.start.map(line).join(", ")}`,
    `  stop: ${t.stop.map(line).join(", ")}`,
  ];
}
