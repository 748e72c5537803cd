"""The one exception type for mistakes a user can fix: bad input, impossible settings."""


class UserError(Exception):
    """An error in the user's input or settings; the CLI prints its message and exits with code 2."""


def read_user_file(path, what: str, hint: str) -> str:
    """Read a text file the user named; a missing or unreadable file is a UserError naming `what`.

    `hint` says how to fix a wrong path, for example "pass the path of a Hugging Face config.json".
    """
    try:
        return path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; {hint}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}; {hint}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def prepare_output_folder(path, option: str = "--out") -> None:
    """Create the output folder `path` now, so that a bad path fails before any simulation runs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{option}: {path} exists and is not a folder; choose a folder for the results") from None
    except OSError as exc:
        raise UserError(f"{option}: cannot create the folder {path} ({exc.strerror}); "
                        f"choose a folder you can write to") from None
