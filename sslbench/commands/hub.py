"""Push an exported folder to the Hugging Face Hub, with every failure as one line that says what to do.

``api`` is anything with ``huggingface_hub.HfApi``'s ``create_repo(repo_id, exist_ok=, private=)`` and
``upload_folder(repo_id=, folder_path=, commit_message=)``; the default is a real ``HfApi`` (which takes its token
from ``HF_TOKEN`` or ``hf auth login``). Tests pass a recording fake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.data.hub import is_network_error

__all__ = ["push_folder", "hub_error"]


def hub_error(exc: BaseException, repo_id: str) -> str:
    """One line naming ``repo_id`` and the likely cause of ``exc`` raised by a ``huggingface_hub`` call."""
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    prefix = f"--push-to-hub {repo_id}:"
    if "OfflineModeIsEnabled" in names:
        return f"{prefix} HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to push"
    if "LocalTokenNotFoundError" in names or status == 401:
        return (f"{prefix} not logged in to the Hugging Face Hub (or the token is invalid); set HF_TOKEN or run "
                f"`hf auth login` ({detail})")
    if "GatedRepoError" in names or status == 403:
        return (f"{prefix} the token may not write to this repository (gated, another owner's, or a read-only "
                f"token); use a token with write access to the namespace ({detail})")
    if "RepositoryNotFoundError" in names or status == 404:
        return f"{prefix} repository or namespace not found, or not visible with this token ({detail})"
    if "HFValidationError" in names or "HfUriError" in names:
        return f"{prefix} not a valid repository id; expected NAMESPACE/NAME ({detail})"
    if status is not None:
        return f"{prefix} the Hub answered HTTP {status} ({detail})"
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or is_network_error(exc) or any(
            n in names for n in ("RequestError", "HTTPError")):
        return (f"{prefix} cannot reach the Hugging Face Hub (no network, a proxy, or a wrong HF_ENDPOINT) "
                f"({type(exc).__name__}: {detail})")
    return f"{prefix} upload failed ({type(exc).__name__}: {detail})"


def push_folder(folder: Path, repo_id: str, *, private: bool = False, api: Any = None,
                commit_message: str = "Upload model exported by sslbench") -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload every file of ``folder`` to it.
    Returns the URL of the commit, or of the repository when the API returns none."""
    if api is None:
        from huggingface_hub import HfApi

        from sslbench.core.version import __version__

        api = HfApi(library_name="sslbench", library_version=__version__)
    try:
        repo = api.create_repo(repo_id, exist_ok=True, private=private or None)  # None: the namespace default
        repo_id = getattr(repo, "repo_id", None) or repo_id
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(hub_error(exc, repo_id)) from None
    return str(getattr(info, "commit_url", None) or getattr(repo, "url", None) or f"hf-hub:{repo_id}")
