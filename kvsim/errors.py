"""The one exception type for mistakes a user can fix: bad input, impossible settings."""


class UserError(Exception):
    """An error in the user's input or settings; the CLI prints its message and exits with code 2."""


def read_user_file(path, what: str, hint: str) -> str:
    """Read a text file the user named; a missing or unreadable file raises a UserError naming `what`.

    `hint` tells how to fix a wrong path, for example "pass the path of a Hugging Face config.json".
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


def parse_json_object(text: str, path, what: str):
    """Parse `text` as a JSON object; invalid JSON or another JSON type raises a UserError naming the file."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} must be a JSON object, got {type(data).__name__}")
    return data


def parse_yaml(text: str, path):
    """Parse `text` with YAML's safe loader; a syntax error raises a UserError with its line and column."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
