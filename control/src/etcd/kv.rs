//! Keys, ranges and transactions: the typed face of etcd's KV messages.

use super::pb::etcdserverpb as rpc;
use super::pb::mvccpb;

use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
use rpc::request_op::Request;
use rpc::response_op::Response;

/// A key and its value with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: Vec<u8>,
    /// Empty for a `keys_only` range and for a delete event.
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: i64,
    /// The revision of the key's last change (for a delete event: the deletion).
    pub mod_revision: i64,
    /// Writes since creation: 1 for a new key, 0 after a delete.
    pub version: i64,
    /// The lease the key is attached to; 0: none.
    pub lease: i64,
}

impl From<mvccpb::KeyValue> for Kv {
    fn from(kv: mvccpb::KeyValue) -> Self {
        Kv {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// What to read: one key, `[start, end)` or a prefix, with options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    key: Vec<u8>,
    range_end: Vec<u8>,
    limit: i64,
    revision: i64,
    descending: bool,
    keys_only: bool,
    count_only: bool,
}

impl Range {
    /// One key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Range {
            key: key.into(),
            ..Range::default()
        }
    }

    /// The keys in `[start, end)`; an `end` of `[0]` means every key from `start`.
    pub fn between(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Range {
            key: start.into(),
            range_end: end.into(),
            ..Range::default()
        }
    }

    /// The keys that start with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        Range {
            key,
            range_end,
            ..Range::default()
        }
    }

    /// At most `limit` keys (0: all); the result says whether there are `more`.
    pub fn limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Reads the store as of `revision` (0: the newest). Paging a large range at the
    /// first page's revision keeps the pages consistent.
    pub fn revision(mut self, revision: i64) -> Self {
        self.revision = revision;
        self
    }

    /// Highest key first (the default is lowest first).
    pub fn descending(mut self) -> Self {
        self.descending = true;
        self
    }

    /// Keys and revisions without the values.
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// Only the number of keys in the range.
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }

    pub(crate) fn to_request(&self) -> rpc::RangeRequest {
        let mut req = rpc::RangeRequest {
            key: self.key.clone(),
            range_end: self.range_end.clone(),
            limit: self.limit,
            revision: self.revision,
            keys_only: self.keys_only,
            count_only: self.count_only,
            ..Default::default()
        };
        if self.descending {
            req.set_sort_order(rpc::range_request::SortOrder::Descend);
            req.set_sort_target(rpc::range_request::SortTarget::Key);
        }
        req
    }
}

/// A range's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResult {
    pub kvs: Vec<Kv>,
    /// The number of keys in the range, whatever the limit.
    pub count: i64,
    /// The limit left keys out.
    pub more: bool,
    /// The store's revision the range read.
    pub revision: i64,
}

impl From<rpc::RangeResponse> for RangeResult {
    fn from(resp: rpc::RangeResponse) -> Self {
        RangeResult {
            kvs: resp.kvs.into_iter().map(Kv::from).collect(),
            count: resp.count,
            more: resp.more,
            revision: header_revision(resp.header.as_ref()),
        }
    }
}

/// A delete's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// How many keys were deleted.
    pub deleted: i64,
    /// The store's revision after the delete (unchanged if nothing was deleted).
    pub revision: i64,
}

/// The end of the range of keys that start with `prefix`, by etcd's rule: the prefix
/// with its last byte below 0xff incremented and the 0xff bytes after it dropped. A
/// prefix of only 0xff bytes (or none) has no such end: `[0]`, which etcd reads as
/// "every key from the start".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// How a [`Compare`] compares the key's field with the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    Greater,
    Less,
    NotEqual,
}

impl CompareOp {
    fn to_pb(self) -> CompareResult {
        match self {
            CompareOp::Equal => CompareResult::Equal,
            CompareOp::Greater => CompareResult::Greater,
            CompareOp::Less => CompareResult::Less,
            CompareOp::NotEqual => CompareResult::NotEqual,
        }
    }
}

/// One guard of a transaction. A missing key has version, create and mod revision 0
/// (and no value: a value comparison with a missing key is false).
#[derive(Debug, Clone, PartialEq)]
pub struct Compare(rpc::Compare);

impl Compare {
    fn new(key: Vec<u8>, op: CompareOp, target: CompareTarget, value: TargetUnion) -> Self {
        let mut c = rpc::Compare {
            key,
            target_union: Some(value),
            ..Default::default()
        };
        c.set_result(op.to_pb());
        c.set_target(target);
        Compare(c)
    }

    /// The key's value.
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self::new(
            key.into(),
            op,
            CompareTarget::Value,
            TargetUnion::Value(value.into()),
        )
    }

    /// The key's version (writes since creation; 0: missing).
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self::new(
            key.into(),
            op,
            CompareTarget::Version,
            TargetUnion::Version(version),
        )
    }

    /// The revision that created the key (0: missing).
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(
            key.into(),
            op,
            CompareTarget::Create,
            TargetUnion::CreateRevision(revision),
        )
    }

    /// The revision of the key's last change (0: missing).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(
            key.into(),
            op,
            CompareTarget::Mod,
            TargetUnion::ModRevision(revision),
        )
    }

    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CompareOp::Equal, 0)
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Writes a key, attached to a lease unless `lease` is 0.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Deletes one key.
    Delete { key: Vec<u8> },
    /// Deletes the keys in `[start, end)`.
    DeleteRange { start: Vec<u8>, end: Vec<u8> },
    /// Reads.
    Range(Range),
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn delete_range(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Op::DeleteRange {
            start: start.into(),
            end: end.into(),
        }
    }

    pub fn range(range: Range) -> Self {
        Op::Range(range)
    }

    fn is_write(&self) -> bool {
        !matches!(self, Op::Range(_))
    }

    fn to_pb(&self) -> rpc::RequestOp {
        let request = match self {
            Op::Put { key, value, lease } => Request::RequestPut(rpc::PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease: *lease,
            }),
            Op::Delete { key } => Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key: key.clone(),
                range_end: Vec::new(),
            }),
            Op::DeleteRange { start, end } => {
                Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                    key: start.clone(),
                    range_end: end.clone(),
                })
            }
            Op::Range(range) => Request::RequestRange(range.to_request()),
        };
        rpc::RequestOp {
            request: Some(request),
        }
    }
}

/// A transaction: if every compare holds, the `and_then` operations, else the `or_else`
/// ones, atomically in one revision. etcd accepts at most [`MAX_TXN_OPS`](super::MAX_TXN_OPS)
/// operations per branch by default and refuses a key written twice in one branch; the
/// client does not split a transaction.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compares: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
    resend: bool,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    /// Guards (all must hold).
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Operations when the guards hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Operations when a guard fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// Allows re-sending the transaction on another endpoint after an attempt whose
    /// outcome is unknown (timeout, connection lost). Off by default for a transaction
    /// with guards and writes: if the lost attempt was applied, the re-sent one would
    /// find its guards broken by its own writes and report `succeeded: false`. Set it
    /// when a re-run is harmless (the writes carry an id the caller checks, say).
    /// Transactions without guards or without writes are always re-sent.
    pub fn resend_if_unknown(mut self) -> Self {
        self.resend = true;
        self
    }

    /// The number of operations of the larger branch (etcd's limit applies to each).
    pub fn op_count(&self) -> usize {
        self.success.len().max(self.failure.len())
    }

    pub(crate) fn may_resend(&self) -> bool {
        self.resend
            || self.compares.is_empty()
            || !self.success.iter().chain(&self.failure).any(Op::is_write)
    }

    pub(crate) fn to_request(&self) -> rpc::TxnRequest {
        rpc::TxnRequest {
            compare: self.compares.iter().map(|c| c.0.clone()).collect(),
            success: self.success.iter().map(Op::to_pb).collect(),
            failure: self.failure.iter().map(Op::to_pb).collect(),
        }
    }
}

/// A transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Every guard held (the `and_then` branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// One answer per operation of the branch that ran, in order.
    pub responses: Vec<OpResponse>,
}

/// One operation's answer in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    Put,
    Delete { deleted: i64 },
    Range(RangeResult),
}

impl From<rpc::TxnResponse> for TxnResult {
    fn from(resp: rpc::TxnResponse) -> Self {
        TxnResult {
            succeeded: resp.succeeded,
            revision: header_revision(resp.header.as_ref()),
            responses: resp
                .responses
                .into_iter()
                .filter_map(|r| {
                    Some(match r.response? {
                        Response::ResponsePut(_) => OpResponse::Put,
                        Response::ResponseDeleteRange(d) => {
                            OpResponse::Delete { deleted: d.deleted }
                        }
                        Response::ResponseRange(r) => OpResponse::Range(r.into()),
                    })
                })
                .collect(),
        }
    }
}

pub(crate) fn header_revision(header: Option<&rpc::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"/ztp/"), b"/ztp0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), b"a\xff");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[test]
    fn guarded_writes_are_not_resent_by_default() {
        let guarded = Txn::new()
            .when([Compare::absent("k")])
            .and_then([Op::put("k", "v")]);
        assert!(!guarded.may_resend());
        assert!(guarded.clone().resend_if_unknown().may_resend());
        assert!(Txn::new().and_then([Op::put("k", "v")]).may_resend());
        assert!(Txn::new()
            .when([Compare::version("k", CompareOp::Greater, 0)])
            .and_then([Op::range(Range::key("k"))])
            .may_resend());
    }

    #[test]
    fn descending_sorts_by_key() {
        let req = Range::prefix("p").descending().to_request();
        assert_eq!(req.sort_order(), rpc::range_request::SortOrder::Descend);
        assert_eq!(req.sort_target(), rpc::range_request::SortTarget::Key);
        assert_eq!(req.range_end, b"q");
    }
}
