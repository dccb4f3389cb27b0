//! The directory process gives back the memory of a bulk import: measured on the real
//! process (`cms serve directory` on SQLite, over mTLS), as its own resident memory
//! (`RssAnon`; the pages of SQLite's memory map of the database are the kernel's cache).
//! The full-size figures come from the directory_import bench.

use std::sync::Arc;
use std::time::Duration;

use cms_proto::directory::v1::{
    ImportUsersOptions, ImportUsersRequest, SearchUsersRequest, import_users_request::Payload,
};
use cms_tests::directory_process::{self, Memory};

/// Enough users that an import's leftovers show (the 1M took 1.7 GB before).
const USERS: usize = 100_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_large_import_gives_its_memory_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (layout, mut service) = directory_process::start(dir.path(), "").await;
    let pid = service.process.id().expect("pid");
    let mut client =
        cms_launcher::bootstrap::directory_client(&layout, service.grpc).expect("client");
    client
        .search_users(SearchUsersRequest {
            query: "x".into(),
            ..Default::default()
        })
        .await
        .expect("search");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = Memory::of(pid);

    let csv = Arc::new(directory_process::users_csv(USERS));
    let options = ImportUsersRequest {
        payload: Some(Payload::Options(ImportUsersOptions {
            has_header: true,
            ..Default::default()
        })),
        auth: None,
    };
    let chunks = csv.chunks(64 * 1024).map(|c| ImportUsersRequest {
        payload: Some(Payload::CsvChunk(c.to_vec())),
        auth: None,
    });
    let messages: Vec<ImportUsersRequest> = std::iter::once(options).chain(chunks).collect();
    let report = client
        .import_users(tokio_stream::iter(messages))
        .await
        .expect("import")
        .into_inner()
        .report
        .expect("report");
    assert_eq!(report.created as usize, USERS);
    let after = Memory::of(pid);

    // Searches still work on the connections opened again.
    let found = client
        .search_users(SearchUsersRequest {
            query: "E00000042".into(),
            ..Default::default()
        })
        .await
        .expect("search after the import")
        .into_inner();
    assert_eq!(found.results.len(), 1, "{found:?}");
    service.stop(Duration::from_secs(15)).await;
    println!(
        "RssAnon idle {} KiB, after importing {USERS} users {} KiB",
        idle.rss_anon, after.rss_anon
    );
    assert!(
        after.rss_anon <= 2 * idle.rss_anon,
        "own memory after importing {USERS} users: {} KiB, idle {} KiB (at most 2x)",
        after.rss_anon,
        idle.rss_anon
    );
}
