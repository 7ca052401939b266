/**
 * `deno task compile`: builds `dist/mpq`, one file that runs from any directory with no
 * node_modules and no source tree beside it.
 *
 * - With `DENORT_BIN` set (a local denort runtime), a true `deno compile` binary.
 * - Otherwise a POSIX sh launcher followed by a tar.gz payload holding the Deno runtime
 *   (`Deno.execPath()`) and the program bundled by `deno bundle`. On first start the launcher
 *   extracts the payload once to `${XDG_CACHE_HOME:-$HOME/.cache}/mpq/<hash>` (atomically, by
 *   renaming a fully extracted temp dir) and then execs
 *   `deno run -A --no-config --cached-only mpq.js` with `MPQ_SELF` set to the launcher's own path, so
 *   mpq can re-spawn itself. Starting needs no network access.
 *
 * Usage: deno run -A tools/compile.ts [--output PATH] [--mode auto|deno-compile|launcher]
 * @module
 */
import { parseArgs } from "node:util";

const ROOT = new URL("../", import.meta.url).pathname;

/** How dist/mpq is made. */
export type CompileMode = "deno-compile" | "launcher";

/** Options for compile(). */
export interface CompileOptions {
  /** Output path (default dist/mpq under the project root). */
  output?: string;
  /** "auto" (default): deno-compile when DENORT_BIN is set, else launcher. */
  mode?: CompileMode | "auto";
}

async function run(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; cwd?: string } = {},
) {
  const out = await new Deno.Command(cmd, {
    args,
    cwd: options.cwd ?? ROOT,
    env: options.env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim();
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${out.code}): ${err}`);
  }
  return new TextDecoder().decode(out.stdout);
}

async function sha256hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return Array.from(d.slice(0, 16), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Width of the zero-padded payload offset written into the launcher. */
const OFFSET_WIDTH = 12;

/**
 * The launcher script for a payload with content hash `hash` starting at byte `offset` (1-based,
 * for `tail -c +N`). Pure: the same inputs give the same bytes.
 */
export function launcherScript(hash: string, offset: number): string {
  if (!/^[0-9a-f]{16,64}$/.test(hash)) {
    throw new Error(`payload hash must be hex: got ${JSON.stringify(hash)}`);
  }
  const off = String(offset).padStart(OFFSET_WIDTH, "0");
  if (off.length !== OFFSET_WIDTH) throw new Error(`payload offset too large: ${offset}`);
  return `#!/bin/sh
# mpq: single-file launcher. A tar.gz payload (the Deno runtime and the bundled mpq program) follows
# this script; it is extracted once to a cache dir keyed by its hash, then run from there.
set -eu
self=$(readlink -f -- "$0" 2>/dev/null || printf '%s' "$0")
base="\${XDG_CACHE_HOME:-\${HOME:-/tmp}/.cache}/mpq"
dir="$base/${hash}"
if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$base"
  tmp=$(mktemp -d "$base/.extract.XXXXXX")
  if ! tail -c +${off} -- "$self" | tar -xzf - -C "$tmp"; then
    rm -rf "$tmp"
    echo "mpq: cannot extract the runtime from $self into $tmp" >&2
    exit 1
  fi
  : > "$tmp/.complete"
  # Atomic publish; another launcher may have won the race, then ours is dropped.
  mv -T -- "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
fi
MPQ_SELF="$self" DENO_DIR="$dir/deno_dir" DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 \\
  exec "$dir/deno" run -A --no-config --no-lock --cached-only --quiet "$dir/mpq.js" "$@"
exit 127
`;
}

async function bundle(out: string): Promise<void> {
  await run(Deno.execPath(), ["bundle", "--quiet", "--platform", "deno", "-o", out, `${ROOT}main.ts`]);
}

async function buildLauncher(output: string): Promise<void> {
  const stage = await Deno.makeTempDir({ prefix: "mpq-compile-" });
  try {
    await bundle(`${stage}/mpq.js`);
    await Deno.copyFile(Deno.execPath(), `${stage}/deno`);
    await Deno.chmod(`${stage}/deno`, 0o755);
    // Reproducible archive: fixed order, owner and mtime.
    await run("sh", [
      "-c",
      'tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1" -cf - deno mpq.js | gzip -6n > "$1/payload.tar.gz"',
      "sh",
      stage,
    ]);
    const payload = await Deno.readFile(`${stage}/payload.tar.gz`);
    const hash = await sha256hex(payload);
    // The offset depends on the script length, which is fixed because the offset is zero-padded.
    const probe = new TextEncoder().encode(launcherScript(hash, 0));
    const script = new TextEncoder().encode(launcherScript(hash, probe.byteLength + 1));
    if (script.byteLength !== probe.byteLength) throw new Error("launcher length changed with its offset");
    const tmp = `${output}.tmp-${Deno.pid}`;
    const file = await Deno.open(tmp, { write: true, create: true, truncate: true, mode: 0o755 });
    try {
      await file.write(script);
      let off = 0;
      while (off < payload.byteLength) off += await file.write(payload.subarray(off));
    } finally {
      file.close();
    }
    await Deno.chmod(tmp, 0o755);
    await Deno.rename(tmp, output);
  } finally {
    await Deno.remove(stage, { recursive: true });
  }
}

async function buildDenoCompile(output: string, denort: string): Promise<void> {
  await Deno.stat(denort).catch(() => {
    throw new Error(`DENORT_BIN=${denort}: no such file (expected a denort runtime binary)`);
  });
  // Compile the bundle from a scratch dir: compiling main.ts in the project would embed all of
  // node_modules (the npm "deno" package is itself a 95 MiB binary).
  const stage = await Deno.makeTempDir({ prefix: "mpq-compile-" });
  try {
    await bundle(`${stage}/mpq.js`);
    await run(
      Deno.execPath(),
      ["compile", "-A", "--quiet", "--no-config", "--no-check", "-o", output, `${stage}/mpq.js`],
      { env: { ...Deno.env.toObject(), DENORT_BIN: denort }, cwd: stage },
    );
  } finally {
    await Deno.remove(stage, { recursive: true });
  }
}

/**
 * Builds the single-file mpq and returns the mode used and the output path.
 * @example
 * const { mode, output } = await compile({ output: "/tmp/mpq" });
 */
export async function compile(options: CompileOptions = {}): Promise<{ mode: CompileMode; output: string }> {
  const output = options.output ?? `${ROOT}dist/mpq`;
  const dir = output.includes("/") ? output.slice(0, output.lastIndexOf("/")) : ".";
  await Deno.mkdir(dir || "/", { recursive: true });
  const denort = Deno.env.get("DENORT_BIN");
  let mode: CompileMode;
  if (options.mode === undefined || options.mode === "auto") mode = denort ? "deno-compile" : "launcher";
  else mode = options.mode;
  if (mode === "deno-compile") {
    if (!denort) {
      throw new Error("--mode deno-compile needs DENORT_BIN (the path of a denort runtime binary)");
    }
    await buildDenoCompile(output, denort);
  } else {
    await buildLauncher(output);
  }
  return { mode, output };
}

const USAGE = `Usage: deno task compile [--output PATH] [--mode auto|deno-compile|launcher]

Builds dist/mpq, one file: a deno compile binary when DENORT_BIN names a denort runtime,
otherwise a launcher carrying the Deno runtime and the bundled program.`;

if (import.meta.main) {
  let values;
  try {
    ({ values } = parseArgs({
      args: Deno.args,
      options: {
        output: { type: "string", short: "o" },
        mode: { type: "string" },
        help: { type: "boolean" },
      },
    }));
  } catch (e) {
    console.error(`compile: ${(e as Error).message}\n\n${USAGE}`);
    Deno.exit(1);
  }
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const mode = values.mode ?? "auto";
  if (!["auto", "deno-compile", "launcher"].includes(mode)) {
    console.error(`compile: --mode must be auto, deno-compile or launcher: got ${mode}\n\n${USAGE}`);
    Deno.exit(1);
  }
  const r = await compile({ output: values.output, mode: mode as CompileMode | "auto" });
  const size = (await Deno.stat(r.output)).size;
  console.log(`${r.output}: ${(size / 2 ** 20).toFixed(1)} MiB (${r.mode})`);
}
