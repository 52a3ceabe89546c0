use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zebu_api::ApiErrorBody;

/// An API error: an HTTP status and a message that says what failed and what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }
    pub fn not_found(message: String) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }
    pub fn conflict(message: String) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            message,
        }
    }
    pub fn unavailable(message: String) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message,
        }
    }
    pub fn forbidden(message: String) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message,
        }
    }
    pub fn internal(message: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        }
    }
    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API token: pass --token or set ZEBU_TOKEN (the manager wrote it to <data-dir>/admin.token)".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}
