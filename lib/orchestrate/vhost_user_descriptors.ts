/**
 * QEMU's vhost-user back-end descriptors (docs/interop/vhost-user.json): JSON files naming an
 * installed back-end's program and device type, found in /usr/share/qemu/vhost-user (vendors),
 * /etc/qemu/vhost-user (the administrator) and $XDG_CONFIG_HOME/qemu/vhost-user (the user). A file
 * in a later directory replaces a file of the same name in an earlier one; the files are then taken
 * in name order (the numeric prefix is the priority: 50-qemu-virtiofsd.json before 60-x.json).
 * @module
 */

/** One descriptor file, read. */
export interface DescriptorFile {
  /** The file name, e.g. "50-qemu-virtiofsd.json". */
  name: string;
  path: string;
  text: string;
}

/** A usable descriptor. */
export interface Descriptor {
  /** The name without the numeric prefix and `.json` ("qemu-virtiofsd"). */
  name: string;
  /** The device type ("fs", "gpu", "block", ...). */
  type: string;
  binary: string;
  path: string;
}

/** The directories searched, lowest precedence first. */
export function descriptorDirs(env: { XDG_CONFIG_HOME?: string; HOME?: string } = {}): string[] {
  const user = env.XDG_CONFIG_HOME ?? (env.HOME ? `${env.HOME}/.config` : undefined);
  return ["/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user", ...(user ? [`${user}/qemu/vhost-user`] : [])];
}

/** The short name of a descriptor file: numeric prefix and `.json` dropped. */
export function shortName(file: string): string {
  return file.replace(/\.json$/, "").replace(/^\d+-/, "");
}

/**
 * Picks the descriptor `wanted` names (pure): by short name, else the highest-priority one of that
 * type. `files` are every directory's files, lowest precedence first. Throws naming what was there.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const files = [
 *   { name: "50-qemu-virtiofsd.json", path: "/usr/share/qemu/vhost-user/50-qemu-virtiofsd.json",
 *     text: '{"description": "virtiofsd", "type": "fs", "binary": "/usr/lib/qemu/virtiofsd"}' },
 * ];
 * assert.equal(pickDescriptor("qemu-virtiofsd", files).binary, "/usr/lib/qemu/virtiofsd");
 * assert.equal(pickDescriptor("fs", files).name, "qemu-virtiofsd"); // by type
 * ```
 */
export function pickDescriptor(wanted: string, files: readonly DescriptorFile[]): Descriptor {
  const byName = new Map<string, DescriptorFile>();
  for (const f of files) if (f.name.endsWith(".json")) byName.set(f.name, f); // later dirs replace
  const ordered = [...byName.values()].sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  const parsed: Descriptor[] = [];
  const problems: string[] = [];
  for (const f of ordered) {
    let j: unknown;
    try {
      j = JSON.parse(f.text);
    } catch (e) {
      problems.push(`${f.path}: not JSON (${(e as Error).message})`);
      continue;
    }
    const o = j as { type?: unknown; binary?: unknown };
    if (typeof j !== "object" || j === null || typeof o.type !== "string" || typeof o.binary !== "string") {
      problems.push(`${f.path}: needs "type" and "binary" strings`);
      continue;
    }
    parsed.push({ name: shortName(f.name), type: o.type, binary: o.binary, path: f.path });
  }
  const hit = parsed.find((d) => d.name === wanted) ?? parsed.find((d) => d.type === wanted);
  if (hit) return hit;
  const known = parsed.map((d) => `${d.name} (type ${d.type})`).join(", ") || "none";
  throw new Error(
    `no vhost-user descriptor named or of type ${JSON.stringify(wanted)} (found: ${known})` +
      (problems.length ? `; skipped: ${problems.join("; ")}` : ""),
  );
}

/** Reads every descriptor file of `dirs` (missing directories are skipped). */
export function readDescriptorFiles(dirs: readonly string[]): DescriptorFile[] {
  const out: DescriptorFile[] = [];
  for (const dir of dirs) {
    let entries: Deno.DirEntry[];
    try {
      entries = [...Deno.readDirSync(dir)];
    } catch {
      continue;
    }
    for (const e of entries) {
      if (!e.name.endsWith(".json")) continue;
      const path = `${dir}/${e.name}`;
      try {
        out.push({ name: e.name, path, text: Deno.readTextFileSync(path) });
      } catch { /* unreadable: as if absent */ }
    }
  }
  return out;
}
