//! The CRI image service, as kubelet calls it (runtime.v1; only the fields
//! the tests use): PullImage, with a pull secret or not, and ListImages.

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

/// A pull secret as kubelet passes it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesResponse {
    #[prost(message, repeated, tag = "1")]
    pub images: Vec<Image>,
}

async fn unary<Req, Resp>(socket: &std::path::Path, method: &'static str, req: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let channel = containerd_client::connect(socket).await.expect("connect to the CRI socket");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let resp: tonic::Response<Resp> =
        grpc.unary(tonic::Request::new(req), path, tonic::codec::ProstCodec::default()).await?;
    Ok(resp.into_inner())
}

/// PullImage of `image` on the CRI image service at `socket`; its image ref.
pub async fn pull(socket: &std::path::Path, image: &str) -> Result<String, tonic::Status> {
    pull_with(socket, image, None).await
}

/// PullImage with a pull secret.
pub async fn pull_with(
    socket: &std::path::Path,
    image: &str,
    auth: Option<AuthConfig>,
) -> Result<String, tonic::Status> {
    let req = PullImageRequest { image: Some(ImageSpec { image: image.to_string() }), auth };
    let resp: PullImageResponse = unary(socket, "/runtime.v1.ImageService/PullImage", req).await?;
    Ok(resp.image_ref)
}

/// ListImages on the CRI image service at `socket`.
pub async fn list(socket: &std::path::Path) -> Result<Vec<Image>, tonic::Status> {
    let resp: ListImagesResponse = unary(socket, "/runtime.v1.ImageService/ListImages", ListImagesRequest {}).await?;
    Ok(resp.images)
}
