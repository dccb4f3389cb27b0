//! The console's pages, compiled into the binary: no CDN, no build step, nothing fetched at
//! run time. One HTML shell, one stylesheet, two scripts (the app and the code checksum), an icon.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../console/index.html"),
    },
    Asset {
        path: "/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../console/console.css"),
    },
    Asset {
        path: "/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/console.js"),
    },
    Asset {
        path: "/code.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/code.js"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../../console/favicon.svg"),
    },
];

/// The paths of the pages and their files.
pub fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|asset| asset.path)
}

/// GET (and HEAD) for every asset; other methods get 405 from the router.
pub fn routes() -> Router {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        let (content_type, body) = (asset.content_type, asset.body);
        router.route(
            asset.path,
            get(move || async move { ([(header::CONTENT_TYPE, content_type)], body).into_response() }),
        )
    })
}
