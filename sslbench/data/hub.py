"""A quick look at a Hugging Face Hub dataset before anything is loaded, so a dataset that cannot be had fails in a
second with one line that says why and what to do, instead of after building the model and half a minute of the
hub client's retries ("Couldn't reach 'ILSVRC/imagenet-1k'").

The causes told apart: the hub cannot be reached (offline, a firewall), the dataset does not exist (or is private
and no token is set), and a gated dataset (ImageNet-1k on the Hub is gated) without a token or without accepted
terms. Each message names the dataset and the local alternatives: the datasets cache in offline mode, or a local
copy read with ``source = "imagefolder"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError

__all__ = ["check_hub_dataset", "hub_offline", "is_network_error"]

LOCAL_ALTERNATIVE = ('a local copy works without the hub: data.train = { source = "imagefolder", path = '
                     '"/data/imagenet/train" } (one sub-folder of images per class), or source = "disk" / "parquet"')
TOKEN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def hub_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline (then the datasets cache is used)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_network_error(exc: BaseException) -> bool:
    """A failure to reach the server at all, whichever HTTP client huggingface_hub uses (httpx or requests)."""
    names = _names(exc)
    if names & {"ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException", "Timeout", "ReadTimeout",
                "NetworkError", "TransportError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_network_error(cause)


def check_hub_dataset(path: str, key: str, api: Any = None, timeout: float = 10.0) -> None:
    """Raise a one-line :class:`UserError` naming ``key`` (``data.train``) when the Hub dataset ``path`` cannot be
    loaded from the hub; return quietly when it can, when ``path`` is a local folder or script, or in offline mode.

    ``api`` is a ``huggingface_hub.HfApi`` (injectable for tests)."""
    if Path(path).exists() or hub_offline():
        return
    import huggingface_hub
    from huggingface_hub import errors

    api = api or huggingface_hub.HfApi()
    where = f"{key}: Hugging Face dataset {path!r}"
    try:
        info = api.dataset_info(path, timeout=timeout)
    except errors.GatedRepoError:
        raise UserError(_gated(where, path)) from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{where} was not found on the Hub (check the name; a private dataset also looks like this "
                        f"without a token: {TOKEN_HINT}); {LOCAL_ALTERNATIVE}") from None
    except Exception as exc:  # noqa: BLE001 - classified below; anything unexpected keeps its own first line
        if is_network_error(exc):
            raise UserError(f"{where}: cannot reach the Hugging Face Hub ({_first_line(exc)}); offline? If the "
                            "dataset is already in your Hugging Face cache, set HF_HUB_OFFLINE=1 to use it; "
                            f"else {LOCAL_ALTERNATIVE}") from None
        raise UserError(f"{where}: the Hub refused it ({_first_line(exc)}); {LOCAL_ALTERNATIVE}") from None
    if getattr(info, "gated", False):
        if not huggingface_hub.get_token():
            raise UserError(_gated(where, path, "no Hugging Face token is set"))
        try:
            api.auth_check(path, repo_type="dataset")
        except errors.GatedRepoError:
            raise UserError(_gated(where, path, "your token's account has not been granted access")) from None
        except Exception:  # noqa: BLE001 - the check is advisory; the load itself will say what is wrong
            pass


def _gated(where: str, path: str, why: str = "access is restricted") -> str:
    return (f"{where} is gated ({why}): accept its terms at https://huggingface.co/datasets/{path} with your "
            f"account, then {TOKEN_HINT}; {LOCAL_ALTERNATIVE}")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:limit]}"
