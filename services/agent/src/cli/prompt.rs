//! Reading what the person types: prompts on stderr (stdout stays clean for `--json`), PINs and
//! keys with echo off on a terminal (rpassword). When stdin is not a terminal (a script), each
//! answer is one line of stdin and nothing is asked twice.

use std::io::{BufRead, IsTerminal, Write};

use zeroize::Zeroizing;

pub struct Prompt {
    interactive: bool,
}

impl Prompt {
    pub fn new() -> Self {
        Prompt {
            interactive: std::io::stdin().is_terminal(),
        }
    }

    /// Whether a person answers (so a refused answer can be asked again).
    pub fn interactive(&self) -> bool {
        self.interactive
    }

    /// Shows a line to the person (stderr; nothing in script mode).
    pub fn say(&self, text: &str) {
        if self.interactive {
            eprintln!("{text}");
        }
    }

    fn read_line(&self) -> Result<Zeroizing<String>, String> {
        let mut line = Zeroizing::new(String::new());
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            return Err("input ended before the answer".into());
        }
        let trimmed = Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned());
        Ok(trimmed)
    }

    /// A visible answer.
    pub fn line(&self, question: &str) -> Result<Zeroizing<String>, String> {
        if self.interactive {
            eprint!("{question}");
            let _ = std::io::stderr().flush();
        }
        self.read_line()
    }

    /// A hidden answer (echo off on a terminal).
    pub fn secret(&self, question: &str) -> Result<Zeroizing<String>, String> {
        if self.interactive {
            rpassword::prompt_password(question)
                .map(Zeroizing::new)
                .map_err(|e| format!("cannot read the answer: {e}"))
        } else {
            self.read_line()
        }
    }

    /// The new PIN: twice with echo off on a terminal, once from a script.
    pub fn new_pin(&self) -> Result<Zeroizing<String>, String> {
        loop {
            let pin = self.secret("New PIN: ")?;
            if !self.interactive {
                return Ok(pin);
            }
            let again = self.secret("New PIN again: ")?;
            if *pin == *again {
                return Ok(pin);
            }
            self.say("The two PINs differ; enter the new PIN again.");
        }
    }
}
