"""The app's core use case, shared by the page and the API: read the images of a request,
classify them with the served model, and record them in the prediction history when that is on."""

from __future__ import annotations

from dataclasses import replace

from flask import current_app, request

import prediction_history
from serving import Classification, LoadedModel, Upload, clean_filename
from web import rollout
from web.auth import current_viewer
from web.errors import WebError
from web.extensions import model_serving

THUMBNAIL_SIDE = 128


def uploads_from_request(field: str = "image") -> list[Upload]:
    """The images of a request: multipart field `field` (repeatable) or a raw image body."""
    content_type = (request.mimetype or "").lower()
    if content_type.startswith("image/"):
        data = request.get_data(cache=False)
        uploads = [Upload(clean_filename(request.args.get("filename"), "upload"), data)]
    elif content_type == "multipart/form-data":
        files = [f for f in request.files.getlist(field) if f.filename or f.content_length]
        uploads = [Upload(clean_filename(f.filename), f.read()) for f in files]
    else:
        raise WebError(
            f"Send images as multipart/form-data field '{field}' or as a raw body with an image/* content type.",
            "unsupported_media_type" if request.content_length else "no_file",
        )
    if not uploads:
        raise WebError(f"No image was sent: choose a file (multipart field '{field}').", "no_file")
    limit = current_app.config["MAX_IMAGES_PER_REQUEST"]
    if len(uploads) > limit:
        raise WebError(f"Too many images: {len(uploads)} sent, at most {limit} per request.", "too_many_images")
    return uploads


def classify_request(source: str, thumbnails: bool, explain_side: int = 0) -> tuple[LoadedModel, Classification]:
    """Classify the request's images with the version that answers them; each image carries its history id
    once recorded. Thumbnails are made when asked or when the history keeps them; with
    `explain_side`, saliency maps of the top classes too."""
    config = current_app.config
    uploads = uploads_from_request()
    keep_images = bool(config["KEEP_IMAGES"])
    side = THUMBNAIL_SIDE if thumbnails or keep_images else 0
    # The champion answers, or a canary's challenger for its share of images (web/rollout.py).
    loaded, result, route = rollout.classify(model_serving, uploads, side, explain_side)
    if config["RECORD_HISTORY"]:
        owner = current_viewer(create_session=True)
        recorded = prediction_history.record(result.images, loaded, source, keep_images, owner)
        result = replace(result, images=recorded)
    rollout.follow_up(route, result)
    return loaded, result
