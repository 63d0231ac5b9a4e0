//! The one place where a Postgres error becomes a disposition. Every row of `classify` is
//! provoked against a real Postgres in `tests/errors.rs`.

/// What to do about a failed statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Serialization failure or deadlock: run the transaction again here, then report it as
    /// temporary if it keeps failing.
    RetryHere,
    /// The database cannot take writes right now (down, restarting, unreachable): nothing can
    /// be applied, the client should come back later.
    Unavailable,
    /// A temporary problem with this attempt (resources, lock or statement timeout): the client
    /// retries the same transaction later.
    Temporary,
    /// The data is wrong for the database: reject the transaction with this error code. The
    /// client's queue moves on.
    Reject(&'static str),
    /// The schema in Postgres changed under us: refresh the catalog, then reject with
    /// `SCHEMA_MISMATCH` if the operation still does not fit.
    Schema,
}

/// Maps a SQLSTATE (five characters) to a disposition.
pub fn classify(sqlstate: &str) -> Disposition {
    use Disposition::*;
    match sqlstate {
        "40001" | "40P01" => RetryHere,
        "57P01" | "57P02" | "57P03" => Unavailable,
        "55P03" | "57014" => Temporary,
        "23502" => Reject("NOT_NULL_VIOLATION"),
        "23503" => Reject("FOREIGN_KEY_VIOLATION"),
        "23505" => Reject("UNIQUE_VIOLATION"),
        "23514" => Reject("CHECK_VIOLATION"),
        "42501" => Reject("UNAUTHORIZED"),
        // A value too big for what holds it: an index entry, an array of more than 6
        // dimensions. The data, not the moment, is at fault.
        "54000" => Reject("INVALID_DATA"),
        // 42883: no operator for the types crudgate knew (a key column retyped under it).
        "42P01" | "42703" | "42704" | "42804" | "42883" | "428C9" => Schema,
        s if s.starts_with("08") => Unavailable,
        s if s.starts_with("53") || s.starts_with("58") => Temporary,
        s if s.starts_with("23") => Reject("CONSTRAINT_VIOLATION"),
        s if s.starts_with("22") => Reject("INVALID_DATA"),
        // Anything else (a trigger's RAISE, an unexpected rule) is permanent for this data:
        // retrying would block the client's queue forever.
        _ => Reject("UNCLASSIFIED_ERROR"),
    }
}

/// The disposition of any error from the driver. Without a SQLSTATE, a lost or refused
/// connection means the database is unavailable; anything else (a driver-side encoding
/// problem) is our fault, never the client's, so it is temporary.
pub fn classify_error(e: &tokio_postgres::Error) -> Disposition {
    if let Some(db) = e.as_db_error() {
        return classify(db.code().code());
    }
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        Disposition::Unavailable
    } else {
        tracing::error!(error = %e, "driver error");
        Disposition::Temporary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_sqlstates_reject_rather_than_block_the_queue() {
        assert_eq!(classify("P0001"), Disposition::Reject("UNCLASSIFIED_ERROR"));
        assert_eq!(
            classify("23P01"),
            Disposition::Reject("CONSTRAINT_VIOLATION")
        );
        assert_eq!(classify("08006"), Disposition::Unavailable);
    }
}
