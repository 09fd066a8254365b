//! (being written)
pub struct Proxy; pub async fn serve() {}
