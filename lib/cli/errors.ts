/**
 * Errors that end a command with a message and an exit code.
 * @module
 */

/** Bad command-line input: main prints the message, then the usage text, and exits 1. */
export class UsageError extends Error {
  /** Usage text for the subcommand, printed after the message. */
  readonly usage: string;
  constructor(message: string, usage = "") {
    super(message);
    this.name = "UsageError";
    this.usage = usage;
  }
}

/** Input that is well-formed on the command line but unusable (a file, a config): exit 1, no usage. */
export class InputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InputError";
  }
}
