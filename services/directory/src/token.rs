//! Page tokens of this service's listings (format: `cms_kit::page_token`).

use crate::Error;

const VERSION: &str = "d1";

pub fn encode(parts: &[&str]) -> String {
    cms_kit::page_token::encode(VERSION, parts)
}

/// The `n` parts of a token made by [`encode`].
pub fn decode(token: &str, n: usize) -> Result<Vec<String>, Error> {
    cms_kit::page_token::decode(VERSION, token, n)
        .ok_or_else(|| Error::invalid("page.page_token", "not a page token of this listing"))
}
