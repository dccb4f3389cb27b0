//! Audit administration: reading the log (QueryAudit), verifying its chain (VerifyAudit) and
//! exporting its head to keep elsewhere (ExportAuditHead, itself on the record).

use cms_proto::common::v1::PageResponse;
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::AuditEvent;

use crate::audit::gate::{Asker, refusal};
use crate::audit::{self, Event};
use crate::custody::Custody;
use crate::error::Error;
use crate::guards::Peer;

impl Custody {
    /// QueryAudit: the records that match, a page at a time.
    pub(crate) async fn query_audit(
        &self,
        peer: &Peer,
        req: pb::QueryAuditRequest,
    ) -> Result<pb::QueryAuditResponse, Error> {
        self.caller(peer)?.require_admin()?;
        let query = audit::AuditQuery::from_request(&req).map_err(|bad| Error::Invalid {
            field: bad.field,
            message: bad.message,
        })?;
        let page = self.audit.query(query).await?;
        Ok(pb::QueryAuditResponse {
            records: page.records,
            page: Some(PageResponse {
                next_page_token: page.next_page_token,
                total_estimate: 0,
            }),
        })
    }

    /// ExportAuditHead: answered only once the export is on the record.
    pub(crate) async fn export_audit_head(
        &self,
        peer: &Peer,
        req: pb::ExportAuditHeadRequest,
    ) -> Result<pb::ExportAuditHeadResponse, Error> {
        let asker = Asker::new(peer, req.auth.as_ref());
        let head = match self.export_head(peer).await {
            Ok(head) => head,
            Err(error) => {
                let (outcome, reason) = refusal(&error);
                let event = Event::admin_refused(
                    AuditEvent::AuditHeadExport,
                    "ExportAuditHead",
                    &asker,
                    outcome,
                    reason,
                );
                self.record_refusal(event, "ExportAuditHead").await;
                return Err(error);
            }
        };
        let event = Event::head_export(&asker.caller, asker.auth, head.sequence);
        self.audit.record(event, None).await?;
        Ok(pb::ExportAuditHeadResponse { head: Some(head) })
    }

    async fn export_head(&self, peer: &Peer) -> Result<pb::AuditHead, Error> {
        self.caller(peer)?.require_admin()?;
        Ok(self.audit.head().await?)
    }

    /// VerifyAudit: walks the chain from a sequence number, against an exported head.
    pub(crate) async fn verify_audit(
        &self,
        peer: &Peer,
        req: pb::VerifyAuditRequest,
    ) -> Result<pb::VerifyAuditResponse, Error> {
        self.caller(peer)?.require_admin()?;
        let verdict = self
            .audit
            .verify_from(req.from_sequence, req.expected_head.as_ref())
            .await?;
        let (first_bad, reason, detail) = match &verdict.first_bad {
            Some(fault) => (
                fault.seq,
                fault.kind.code().to_owned(),
                fault.detail.clone(),
            ),
            None => (0, String::new(), String::new()),
        };
        Ok(pb::VerifyAuditResponse {
            ok: verdict.first_bad.is_none(),
            records_checked: verdict.checked,
            first_bad_sequence: first_bad,
            reason,
            detail,
            head: Some(pb::AuditHead {
                sequence: verdict.head_seq,
                hash: verdict.head_hash,
                recorded_at: None,
                chain_id: audit::CHAIN_ID.into(),
            }),
        })
    }
}
