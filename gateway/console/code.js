// Codes that people type (challenges, responses, PUKs): the browser's copy of
// services/cardcrypto/src/code.rs, so the unblock tab can check a challenge as it is typed.
// The gateway checks again before anything reaches custody; this copy only spares the user a
// round trip and a wasted try. Tested against the same vectors (tests/browser/code.test.mjs).
//
// Checksum: CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, no reflection, xorout 0) over the raw
// bytes, 4 upper-case hex characters. Input ignores whitespace and dashes, accepts lower case.
// Messages name what is wrong and never echo the typed characters or the expected checksum.

export const CHECKSUM_DIGITS = 4;
export const GROUP_DIGITS = 4;

const POLY = 0x1021;

export function crc16(bytes) {
  let crc = 0xffff;
  for (const byte of bytes) {
    crc ^= byte << 8;
    for (let bit = 0; bit < 8; bit++) {
      crc = crc & 0x8000 ? ((crc << 1) ^ POLY) & 0xffff : (crc << 1) & 0xffff;
    }
  }
  return crc;
}

export function checksum(bytes) {
  return crc16(bytes).toString(16).toUpperCase().padStart(CHECKSUM_DIGITS, "0");
}

// Rust's char::is_whitespace (Unicode White_Space), which code.rs skips like the dash.
const WHITE_SPACE = new Set([
  0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003,
  0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f,
  0x3000,
]);

function isSeparator(cp) {
  return cp === 0x2d || WHITE_SPACE.has(cp);
}

function isHexDigit(cp) {
  return (cp >= 0x30 && cp <= 0x39) || (cp >= 0x41 && cp <= 0x46) || (cp >= 0x61 && cp <= 0x66);
}

function characterClass(cp) {
  if (cp > 0x7f) return "a non-ASCII character";
  if ((cp >= 0x41 && cp <= 0x5a) || (cp >= 0x61 && cp <= 0x7a)) return "a letter other than A-F";
  if (cp < 0x20 || cp === 0x7f) return "a control character";
  return "a punctuation mark";
}

function lengths(values) {
  if (values.length === 0) return "of any length";
  if (values.length === 1) return String(values[0]);
  return `${values.slice(0, -1).join(", ")} or ${values[values.length - 1]}`;
}

export class CodeError extends Error {
  constructor(kind, message, details = {}) {
    super(message);
    this.kind = kind;
    Object.assign(this, details);
  }
}

// Upper-case hex digits of the input, separators skipped.
function normalise(input) {
  const digits = [];
  let position = 0;
  for (const ch of input) {
    position += 1;
    const cp = ch.codePointAt(0);
    if (isSeparator(cp)) continue;
    if (!isHexDigit(cp)) {
      const cls = characterClass(cp);
      throw new CodeError("NotHex", `character ${position} is not a hex digit (it is ${cls})`, {
        position,
        characterClass: cls,
      });
    }
    digits.push(ch.toUpperCase());
  }
  if (digits.length === 0) throw new CodeError("Empty", "no code was entered");
  return digits;
}

// Parses a hex code as typed; expectedLengths in bytes ([8, 16]), empty for any.
export function parseHex(input, expectedLengths = []) {
  const digits = normalise(input);
  const got = digits.length;
  if (expectedLengths.length > 0 && !expectedLengths.some((n) => n * 2 === got)) {
    const expected = expectedLengths.map((n) => n * 2);
    throw new CodeError("WrongLength", `the code has ${got} hex digits, expected ${lengths(expected)}`, {
      gotDigits: got,
      expectedDigits: expected,
    });
  }
  if (got % 2 !== 0) {
    throw new CodeError("OddDigits", `the code has an odd number of hex digits (${got})`, {
      gotDigits: got,
    });
  }
  const bytes = new Uint8Array(got / 2);
  for (let i = 0; i < bytes.length; i++) {
    bytes[i] = parseInt(digits[2 * i] + digits[2 * i + 1], 16);
  }
  return bytes;
}

function parseChecksumField(field) {
  let digits;
  try {
    digits = normalise(field);
  } catch (e) {
    if (e.kind === "Empty") {
      throw new CodeError(
        "ChecksumMissing",
        "the checksum is missing: it is the 4 hex digits shown beside the code, 0 were given",
        { gotDigits: 0 },
      );
    }
    throw new CodeError("ChecksumMalformed", "the checksum must be exactly 4 hex digits (0-9, A-F)");
  }
  if (digits.length < CHECKSUM_DIGITS) {
    throw new CodeError(
      "ChecksumMissing",
      `the checksum is missing: it is the 4 hex digits shown beside the code, ${digits.length} were given`,
      { gotDigits: digits.length },
    );
  }
  if (digits.length > CHECKSUM_DIGITS) {
    throw new CodeError("ChecksumMalformed", "the checksum must be exactly 4 hex digits (0-9, A-F)");
  }
  return digits.join("");
}

// Parses a code and checks it against its separately typed checksum: the code first (a typo
// there is reported as such), then the checksum field, then the match.
export function parseWithChecksum(code, checksumField, expectedLengths = []) {
  const bytes = parseHex(code, expectedLengths);
  const typed = parseChecksumField(checksumField);
  if (checksum(bytes) !== typed) {
    throw new CodeError(
      "ChecksumMismatch",
      "the checksum does not match the code; check both for a typing error",
    );
  }
  return bytes;
}

// Upper-case hex in groups of 4: "1603 EBDF 1C8A 2E72".
export function formatGroups(bytes) {
  const flat = Array.from(bytes, (b) => b.toString(16).toUpperCase().padStart(2, "0")).join("");
  return flat.match(/.{1,4}/g)?.join(" ") ?? "";
}

// What the unblock tab shows while the user types: still typing (no error yet), an error
// that names what is wrong, or a code whose checksum matches.
export function liveStatus(code, checksumField, expectedLengths) {
  let digits;
  try {
    digits = normalise(code);
  } catch (e) {
    if (e.kind === "Empty") return { state: "incomplete", message: "Type the challenge the user reads out." };
    return { state: "error", message: `Challenge: ${e.message}.` };
  }
  const wanted = expectedLengths.map((n) => n * 2);
  const max = Math.max(...wanted);
  if (digits.length > max) {
    return {
      state: "error",
      message: `Challenge: the code has ${digits.length} hex digits, expected ${lengths(wanted)}.`,
    };
  }
  if (!wanted.includes(digits.length)) {
    return {
      state: "incomplete",
      message: `${digits.length} of ${lengths(wanted)} hex digits typed.`,
    };
  }
  let typed;
  try {
    typed = normalise(checksumField);
  } catch (e) {
    if (e.kind === "Empty") return { state: "incomplete", message: "Now type the 4-character checksum." };
    return { state: "error", message: "Checksum: the checksum must be exactly 4 hex digits (0-9, A-F)." };
  }
  if (typed.length < CHECKSUM_DIGITS) {
    return { state: "incomplete", message: `${typed.length} of 4 checksum characters typed.` };
  }
  try {
    parseWithChecksum(code, checksumField, expectedLengths);
  } catch (e) {
    return { state: "error", message: `${e.message[0].toUpperCase()}${e.message.slice(1)}.` };
  }
  return { state: "ok", message: "The checksum matches: the challenge was typed correctly." };
}
