/** mpq's version, printed by `mpq --version`. */
export const VERSION = "0.1.0";
