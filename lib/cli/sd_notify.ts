/**
 * systemd's service notification protocol (sd_notify(3)): when the service manager set
 * NOTIFY_SOCKET (`Type=notify`), state lines such as `READY=1`, `STATUS=...` and `STOPPING=1` go
 * to it as one datagram each. Without NOTIFY_SOCKET nothing is sent. A manager that went away is
 * not our failure: the first error is logged, later ones are dropped.
 * @module
 */
import { sendDatagram } from "../../ffi/mod.ts";

let reported = false;

/**
 * Sends `state` (newline-separated `KEY=VALUE` lines) to $NOTIFY_SOCKET, if set.
 * @example
 * ```ts
 * sdNotify("READY=1\nSTATUS=guest running"); // a no-op unless started by systemd with Type=notify
 * ```
 */
export function sdNotify(state: string, log: (line: string) => void = (l) => console.error(l)): void {
  const path = Deno.env.get("NOTIFY_SOCKET");
  if (!path) return;
  try {
    sendDatagram(path, new TextEncoder().encode(state));
  } catch (e) {
    if (reported) return;
    reported = true;
    log(`mpq: cannot notify the service manager at ${path}: ${(e as Error).message}`);
  }
}
