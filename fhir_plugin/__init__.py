"""fhir-plugin: checks a patient's FHIR R4 record for the documentation an ICD-10-CM code needs,
and drafts a provisional Condition and a phased CarePlan for clinician review.

The public API is what this module names; the underscored modules are internal.
"""

from ._cards import (
    CardContext,
    cards_for_review,
    cds_discovery,
    cds_service_id,
    needs_review,
    order_sign_cards,
    orders_for_code,
)
from ._check import check
from ._client import FhirClient
from ._drafts import Existing, Phase, build_drafts, draft_identifiers, existing_in, phases_of
from ._errors import (
    AuthError,
    DataUnavailable,
    DraftsRefused,
    Forbidden,
    InputError,
    LaunchError,
    MultipleMatches,
    NotFound,
    NotLaunched,
    PluginError,
    ProfileError,
    ServerError,
    StateLocked,
    TransportError,
    UsageError,
)
from ._ledger import Ledger
from ._profile import DEFAULT_PROFILE, Profile, available_profiles, load_profile
from ._read import BatchReader, PerTypeReader, RecordReader
from ._record import PatientRecord, load_bundle_file, records_from_bundle
from ._render import render_text
from ._report import CodeFit, ElementResult, RedFlagResult, Report, Suggestion
from ._review import Review, review
from ._strategies import STRATEGIES, WRITE_TYPES, Strategies, detected_strategies, server_capabilities, strategies_for
from ._version import __version__
from ._write import DraftWriter, FoldingWriter, LedgerWriter, PerResourceWriter, TransactionWriter, WriteResult

__all__ = [
    "__version__",
    "check",
    "load_profile",
    "available_profiles",
    "Profile",
    "DEFAULT_PROFILE",
    "PatientRecord",
    "records_from_bundle",
    "load_bundle_file",
    "Report",
    "ElementResult",
    "RedFlagResult",
    "CodeFit",
    "Suggestion",
    "render_text",
    "build_drafts",
    "draft_identifiers",
    "phases_of",
    "Phase",
    "DraftsRefused",
    "Existing",
    "existing_in",
    "review",
    "Review",
    "CardContext",
    "cards_for_review",
    "order_sign_cards",
    "cds_discovery",
    "cds_service_id",
    "needs_review",
    "orders_for_code",
    "FhirClient",
    "RecordReader",
    "BatchReader",
    "PerTypeReader",
    "DraftWriter",
    "TransactionWriter",
    "PerResourceWriter",
    "LedgerWriter",
    "FoldingWriter",
    "Ledger",
    "WriteResult",
    "Strategies",
    "strategies_for",
    "detected_strategies",
    "server_capabilities",
    "WRITE_TYPES",
    "STRATEGIES",
    "PluginError",
    "UsageError",
    "ProfileError",
    "InputError",
    "TransportError",
    "ServerError",
    "NotFound",
    "AuthError",
    "MultipleMatches",
    "DataUnavailable",
    "LaunchError",
    "NotLaunched",
    "Forbidden",
    "StateLocked",
]
